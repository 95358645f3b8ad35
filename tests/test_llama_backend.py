"""The local backend on the real llama.cpp: the starter model and tiny Qwen GGUFs."""

from __future__ import annotations

import threading

import pytest

from tongyi_local import (ContextOverflowError, GeneratorClosedError, InvalidRequestError, Message,
                          load)
from tongyi_local.backends.llama import LlamaGenerator

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 16}


def test_greedy_is_deterministic_across_calls_and_instances(starter, starter_path):
    first = starter.complete(PROMPT, **GREEDY)
    again = starter.complete(PROMPT, **GREEDY)  # reuses the cached prompt prefix
    assert again.usage.cached_prompt_tokens > 0
    with LlamaGenerator(starter_path, n_ctx=512) as fresh:
        other = fresh.complete(PROMPT, **GREEDY)
    assert first.text == again.text == other.text
    assert first.text.strip()


def test_max_tokens_is_honoured_exactly(starter):
    done = starter.complete(PROMPT, temperature=0, max_tokens=7, ignore_eos=True)
    assert done.usage.completion_tokens == 7
    assert done.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_returned(starter):
    free = starter.complete(PROMPT, temperature=0, max_tokens=40)
    assert "." in free.text, "the reference continuation needs a full stop for this test"
    stopped = starter.complete(PROMPT, temperature=0, max_tokens=40, stop=["."])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(".")]
    chunks = list(starter.stream(PROMPT, temperature=0, max_tokens=40, stop=["."]))
    assert "".join(c.text for c in chunks) == stopped.text


def test_stream_joins_to_the_same_text_as_complete(starter):
    whole = starter.complete("Once upon a time", temperature=0, max_tokens=24)
    chunks = list(starter.stream("Once upon a time", temperature=0, max_tokens=24))
    assert len(chunks) > 2
    assert all(c.completion is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == whole.finish_reason and last.completion is not None
    assert "".join(c.text for c in chunks) == whole.text == last.completion.text


def test_chat_applies_the_model_chat_template(starter):
    messages = [Message("system", "Answer briefly."), Message("user", "Name a colour.")]
    rendered = starter.render_chat(tuple(messages))
    assert rendered.startswith("<start_of_turn>user\n")
    assert "Answer briefly." in rendered and rendered.endswith("<start_of_turn>model\n")
    done = starter.chat(messages, temperature=0, max_tokens=8)
    assert done.usage.prompt_tokens == len(starter.tokenize(rendered))
    assert done.finish_reason in ("stop", "length")


def test_timings_are_positive_and_consistent(starter):
    done = starter.complete("Write a list of fruits:", temperature=0, max_tokens=20,
                            ignore_eos=True)
    t = done.timings
    assert t.load_ms > 0 and t.prompt_eval_ms > 0 and t.ttft_ms >= t.prompt_eval_ms
    assert t.decode_tokens == done.usage.completion_tokens - 1 == 19
    assert t.decode_ms > 0
    assert t.decode_tokens_per_s == pytest.approx(t.decode_tokens / (t.decode_ms / 1e3))
    assert t.total_ms >= t.ttft_ms + t.decode_ms * 0.99


def test_sampling_with_seed_is_reproducible(starter_path):
    # Bit-exact repeatability needs the same KV state: evaluating a prompt in other batch splits
    # (prefix reuse) changes low-order bits of the logits, which a temperature draw may notice.
    opts = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 1234, "max_tokens": 12}
    texts = []
    for _ in range(2):
        with LlamaGenerator(starter_path, n_ctx=256, reuse_prompt_prefix=False) as gen:
            texts.append(gen.complete("My favourite animal is", **opts).text)
            texts.append(gen.complete("My favourite animal is", **opts).text)
            other = gen.complete("My favourite animal is", **{**opts, "seed": 99})
            penalised = gen.complete("My favourite animal is", **{**opts, "repeat_penalty": 1.3})
    assert len(set(texts)) == 1 and texts[0].strip()
    assert other.usage.completion_tokens >= 1 and penalised.usage.completion_tokens >= 1


def test_two_threads_share_one_model(starter_path):
    # One slot: the threads' requests queue and run one at a time, so greedy texts must equal
    # the solo ones exactly. With several slots they are decoded in one batch, which moves Q4_K
    # logits slightly (tests/test_batching.py covers that case and bounds the difference).
    starter = LlamaGenerator(starter_path, n_ctx=512, slots=1)
    expected = {p: starter.complete(p, **GREEDY).text for p in ("One, two,", "Red, green,")}
    results: dict[str, list[str]] = {p: [] for p in expected}
    errors: list[BaseException] = []

    def worker(prompt: str) -> None:
        try:
            for _ in range(2):
                results[prompt].append(starter.complete(prompt, **GREEDY).text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    starter.close()
    assert not errors
    for prompt, texts in results.items():
        assert texts == [expected[prompt]] * 2


def test_prompt_longer_than_context_names_both_counts(starter_path):
    with LlamaGenerator(starter_path, n_ctx=64) as small:
        n_ctx = small.info.n_ctx  # llama.cpp rounds small contexts up (to 256 cells)
        with pytest.raises(ContextOverflowError) as info:
            small.complete("word " * (n_ctx + 50), max_tokens=4)
        assert info.value.context_tokens == n_ctx
        assert info.value.prompt_tokens > n_ctx
        assert str(n_ctx) in str(info.value) and str(info.value.prompt_tokens) in str(info.value)
        # the model is still usable afterwards
        assert small.complete(PROMPT, temperature=0, max_tokens=3).usage.completion_tokens >= 1


def test_generation_stops_at_the_end_of_the_context(tiny_qwen2):
    with LlamaGenerator(tiny_qwen2, n_ctx=32) as small:
        n_ctx = small.info.n_ctx
        done = small.complete(PROMPT, temperature=0, max_tokens=n_ctx * 2, ignore_eos=True)
    assert done.finish_reason == "length"
    # every cell holds a token; the last token is sampled from the final cell's logits
    assert done.usage.prompt_tokens + done.usage.completion_tokens == n_ctx + 1


def test_invalid_requests_fail_before_any_work(starter):
    with pytest.raises(InvalidRequestError):
        starter.complete(PROMPT, top_p=0)
    with pytest.raises(InvalidRequestError):
        starter.chat([])
    with pytest.raises(InvalidRequestError, match="empty"):
        starter.complete("", max_tokens=2)


def test_closed_generator_refuses_work(starter_path):
    gen = load(starter_path, n_ctx=256)
    gen.close()
    gen.close()  # idempotent
    with pytest.raises(GeneratorClosedError):
        gen.complete(PROMPT)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen3moe"])
def test_tiny_qwen_architectures_load_and_generate(request, fixture):
    path = request.getfixturevalue(fixture)
    with LlamaGenerator(path, n_ctx=256) as gen:
        assert gen.info.architecture == fixture.removeprefix("tiny_")
        assert gen.info.chat_template == "gguf"
        done = gen.complete("hello world", temperature=0, max_tokens=8, ignore_eos=True)
        assert done.usage.completion_tokens == 8 and done.finish_reason == "length"
        rendered = gen.render_chat((Message("user", "hi"),))
        assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        chat = gen.chat([Message("user", "hi")], temperature=0, max_tokens=4)
        assert chat.usage.prompt_tokens == len(gen.tokenize(rendered))
        again = gen.complete("hello world", temperature=0, max_tokens=8, ignore_eos=True)
        assert again.text == done.text
