"""Prompt-lookup speculative decoding on the real llama.cpp: the text with drafts is the text
without them (greedy, and sampled with a seed), wherever a request ends inside a draft; the KV
cache holds exactly the kept tokens; drafts compose with grammars, batching and cancellation.

Exact equality is asserted on models whose logits do not depend on how many tokens a batch holds:
the tiny F32 qwen2 GGUFs and the packaged chat model (Q4_1, no repacked kernels). The starter
model's Q4_K kernels are not batch-invariant; ``benchmarks/speculative.py`` measures it."""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tongyi_local.backends._lookup import Drafter, NgramIndex, SpeculativeConfig, allocate
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.errors import InvalidRequestError

GREEDY = {"temperature": 0}
REPEATING = ["one two three four one two three four one two three four one two",
             "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\ndef h(x):\n",
             "the cat sat on the mat. the cat sat on the mat. the cat sat",
             "hello world"]
ECHO = "Repeat exactly, nothing else: the quick brown fox jumps over the lazy dog"


@contextlib.contextmanager
def speculation(gen: LlamaGenerator, value: str | None):
    before = gen.speculative
    gen.speculative = value
    try:
        yield gen
    finally:
        gen.speculative = before


def both(gen: LlamaGenerator, call):
    """``call(gen)`` with drafting off, then on: (plain, speculative)."""
    with speculation(gen, None):
        plain = call(gen)
    with speculation(gen, "ngram"):
        spec = call(gen)
    return plain, spec


FREE = {"draft_cost": 0}  # every draft with a chance of use is verified, so the tests below
# run the verify path on every match; whether drafts pay is benchmarks/speculative.py's question


@pytest.fixture(scope="module")
def tiny(tiny_qwen2):
    with LlamaGenerator(tiny_qwen2, n_ctx=1024, slots=4, **FREE) as gen:
        yield gen


@pytest.fixture(scope="module")
def chat_spec(chat_model_path):
    with LlamaGenerator(chat_model_path, n_ctx=2048, **FREE) as gen:
        yield gen


# --- the lookup --------------------------------------------------------------------------

def latest_continuation(history: list[int], n: int, limit: int) -> list[int]:
    """The reference: scan back for the latest earlier occurrence of the last n tokens."""
    if len(history) < n:
        return []
    key = history[-n:]
    for start in range(len(history) - n - 1, -1, -1):
        if history[start:start + n] == key:
            return history[start + n:start + n + limit]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=60), st.integers(1, 4), st.integers(0, 10),
       st.integers(0, 60))
def test_draft_is_what_followed_the_latest_earlier_occurrence(history, n, limit, split):
    index = NgramIndex(range(n, n + 1))
    index.extend(history[:split])  # built in two parts, as prompt then generated tokens
    for token in history[split:]:
        index.extend([token])
    draft = index.draft(limit)
    assert draft == latest_continuation(history, n, limit)
    assert len(draft) <= limit


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 8))
def test_longest_matching_ngram_wins_and_no_match_drafts_nothing(history, limit):
    index = NgramIndex(range(1, 4))
    index.extend(history)
    expected = next((d for n in (3, 2, 1) if (d := latest_continuation(history, n, limit))), [])
    assert index.draft(limit) == expected
    if not any(latest_continuation(history, n, 1) for n in (1, 2, 3)):
        assert index.draft(limit) == []


def test_a_fresh_token_drafts_nothing():
    index = NgramIndex(range(1, 4))
    index.extend([5, 6, 7, 5, 6, 7, 9])
    assert index.draft(4) == []
    index.extend([5, 6])
    assert index.draft(4) == [7, 9, 5, 6]  # the latest "5 6" was followed by "7 9"


# --- greedy text unchanged ---------------------------------------------------------------

@pytest.mark.parametrize("prompt", REPEATING)
def test_greedy_text_is_the_same_with_drafts_on_tiny_qwen(tiny, prompt):
    plain, spec = both(tiny, lambda g: g.complete(prompt, max_tokens=60, ignore_eos=True,
                                                  **GREEDY))
    assert spec.text == plain.text
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    assert spec.finish_reason == plain.finish_reason == "length"
    assert plain.timings.draft_tokens == 0
    assert 0 <= spec.timings.accepted_tokens <= spec.timings.draft_tokens


def test_drafts_are_counted_and_save_steps(tiny):
    # the tiny model settles into a loop, so its own output is the best draft source
    spec = both(tiny, lambda g: g.complete(REPEATING[0], max_tokens=80, ignore_eos=True,
                                           **GREEDY))[1]
    t = spec.timings
    assert t.accepted_tokens > 0 and t.draft_tokens >= t.accepted_tokens
    assert t.decode_tokens == spec.usage.completion_tokens - 1  # kept tokens, not steps


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8, 13, 21])
def test_a_draft_never_runs_past_max_tokens(tiny, max_tokens):
    plain, spec = both(tiny, lambda g: g.complete(REPEATING[2], max_tokens=max_tokens,
                                                  ignore_eos=True, **GREEDY))
    assert spec.text == plain.text
    assert spec.usage.completion_tokens == plain.usage.completion_tokens == max_tokens


def test_a_stop_string_inside_a_draft_ends_the_text_where_it_would(tiny):
    plain = both(tiny, lambda g: g.complete(REPEATING[0], max_tokens=80, ignore_eos=True,
                                            **GREEDY))[0].text
    stops = [plain[i:i + 3] for i in (len(plain) // 2, 2 * len(plain) // 3) if plain[i:i + 3].strip()]
    assert stops
    for stop in stops:
        off, on = both(tiny, lambda g: g.complete(REPEATING[0], max_tokens=80, ignore_eos=True,
                                                  stop=[stop], **GREEDY))
        assert on.text == off.text and on.finish_reason == off.finish_reason == "stop"
        assert on.usage.completion_tokens == off.usage.completion_tokens


def test_the_end_of_the_context_inside_a_draft(tiny_qwen2):
    with LlamaGenerator(tiny_qwen2, n_ctx=64, slots=1, **FREE) as gen:
        off, on = both(gen, lambda g: g.complete(REPEATING[0], max_tokens=500, ignore_eos=True,
                                                 **GREEDY))
    assert on.text == off.text and on.finish_reason == off.finish_reason == "length"
    assert on.usage.completion_tokens == off.usage.completion_tokens


def test_the_kv_cache_holds_exactly_the_kept_tokens(tiny):
    import llama_cpp as L

    with speculation(tiny, "ngram"):
        done = tiny.complete(REPEATING[1], max_tokens=70, ignore_eos=True, **GREEDY)
    assert done.timings.draft_tokens > done.timings.accepted_tokens  # some drafts were cut back
    engine = tiny._engine
    for slot in engine._slots:
        held = L.llama_memory_seq_pos_max(engine._mem, slot.id) + 1
        assert held == len(slot.tokens), f"slot {slot.id}: KV holds {held}, tokens {len(slot.tokens)}"


def test_eos_inside_a_draft_ends_the_answer_on_the_chat_model(chat_spec):
    # the model echoes the user's words, and the template put <|im_end|> right after them
    ask = [{"role": "user", "content": ECHO}]
    off, on = both(chat_spec, lambda g: g.chat(ask, max_tokens=60, **GREEDY))
    assert on.text == off.text and on.finish_reason == off.finish_reason == "stop"
    assert on.usage.completion_tokens < 60 and on.timings.accepted_tokens > 0


@pytest.mark.parametrize("prompt", [
    "Repeat this list: apples, pears, plums, apples, pears, plums, apples",
    "Rename x to y in: def add(x, z):\n    return x + z\n\nprint(add(1, 2))\n",
])
def test_greedy_chat_text_is_the_same_with_drafts_on_the_chat_model(chat_spec, prompt):
    ask = [{"role": "user", "content": prompt}]
    off, on = both(chat_spec, lambda g: g.chat(ask, max_tokens=80, **GREEDY))
    assert on.text == off.text and on.finish_reason == off.finish_reason


def test_a_grammar_constrained_tool_call_is_the_same_with_drafts(chat_spec):
    add = {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}}
    ask = [{"role": "user", "content": "Add 2 and 3, and also add 10 and 20."}]
    off, on = both(chat_spec, lambda g: g.chat(ask, tools=[add], tool_choice="required",
                                                max_tokens=120, **GREEDY))
    calls = [[(c.name, c.arguments) for c in d.tool_calls] for d in (off, on)]
    assert calls[1] == calls[0] and on.text == off.text
    assert on.finish_reason == off.finish_reason and len(on.tool_calls) >= 2
    assert on.timings.accepted_tokens > 0  # the repeated calls were drafted under the grammar


# --- sampling, batching, cancellation, options -------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_seeded_sampling_draws_the_same_text_with_drafts(tiny, seed):
    # a draft token is kept only when the sequence's own sampler picks it, one draw per kept
    # token, so the sampler sees the same logits and draws as without drafts: the distribution
    # (and, with a seed, the text) is unchanged
    plain, spec = both(tiny, lambda g: g.complete(REPEATING[seed % 3], max_tokens=50,
                                                  temperature=0.7, top_k=0, top_p=1.0,
                                                  min_p=0.0, seed=seed, ignore_eos=True))
    assert spec.text == plain.text


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value a statistic with ``df`` degrees of freedom exceeds with probability
    ~0.001 (z = 3.09), by the Wilson-Hilferty approximation."""
    k = 2.0 / (9.0 * df)
    return df * (1.0 - k + z * math.sqrt(k)) ** 3


def test_sampled_tokens_follow_the_same_distribution_with_drafts(tiny):
    """Independent seeds with and without drafts: the last token of 30-token sampled runs has
    one distribution (chi-square test of homogeneity at p = 0.001; one draw per run, so the
    counts are independent). The temperature is low because the tiny model's logits are nearly
    flat: only near-greedy sampling repeats itself enough for drafts to be kept."""
    runs, n_tokens = 400, 30
    counts: dict[str, Counter] = {"off": Counter(), "on": Counter()}
    kept = 0
    for mode, first_seed in (("off", 0), ("on", 100_000)):
        with speculation(tiny, "ngram" if mode == "on" else None):
            for seed in range(first_seed, first_seed + runs):
                chunks = list(tiny.stream(REPEATING[2], max_tokens=n_tokens, temperature=0.004,
                                          top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                          ignore_eos=True))
                counts[mode][chunks[-2].text] += 1  # the last token's piece
                kept += chunks[-1].completion.timings.accepted_tokens
    assert kept > runs  # drafts were kept: the runs went through the verify path
    common = {k for k in counts["off"].keys() | counts["on"].keys()
              if counts["off"][k] + counts["on"][k] >= 10}
    cells = {m: [counts[m][k] for k in sorted(common)]
             + [sum(v for k, v in counts[m].items() if k not in common)] for m in counts}
    stat = 0.0
    for j in range(len(cells["off"])):
        both_ways = cells["off"][j] + cells["on"][j]
        for m in cells:
            expected = both_ways / 2  # the same number of runs each way
            stat += (cells[m][j] - expected) ** 2 / expected if expected else 0.0
    assert len(common) >= 4, counts
    assert stat < chi_square_critical(len(cells["off"]) - 1), (stat, cells)


def test_penalised_greedy_is_the_same_with_drafts(tiny):
    plain, spec = both(tiny, lambda g: g.complete(REPEATING[2], max_tokens=50, ignore_eos=True,
                                                  repeat_penalty=1.3, **GREEDY))
    assert spec.text == plain.text


def test_concurrent_requests_draft_in_one_batch(tiny):
    with speculation(tiny, None):
        alone = [tiny.complete(p, max_tokens=40, ignore_eos=True, **GREEDY) for p in REPEATING]
    results: list = [None] * len(REPEATING)
    gate = threading.Barrier(len(REPEATING))

    def work(i):
        gate.wait()
        results[i] = tiny.complete(REPEATING[i], max_tokens=40, ignore_eos=True, **GREEDY)

    with speculation(tiny, "ngram"):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(REPEATING))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert [r.text for r in results] == [a.text for a in alone]
    assert sum(r.timings.accepted_tokens for r in results) > 0


def test_a_cancelled_request_leaves_an_exact_cache_for_the_next(tiny):
    with speculation(tiny, "ngram"):
        stream = tiny.stream(REPEATING[0], max_tokens=200, ignore_eos=True, **GREEDY)
        for _ in zip(range(15), stream):
            pass
        stream.close()
        after = tiny.complete(REPEATING[0], max_tokens=30, ignore_eos=True, **GREEDY)
    with speculation(tiny, None):
        expected = tiny.complete(REPEATING[0], max_tokens=30, ignore_eos=True, **GREEDY)
    assert after.text == expected.text


def test_deterministic_requests_do_not_draft(tiny):
    with speculation(tiny, "ngram"):
        done = tiny.complete(REPEATING[0], max_tokens=40, ignore_eos=True, deterministic=True,
                             **GREEDY)
    assert done.timings.draft_tokens == 0


@pytest.mark.parametrize("kwargs, words", [
    ({"speculative": "eagle"}, "speculative must be 'ngram' or None"),
    ({"max_draft": 0}, "max_draft must be an integer in [1, 64]"),
    ({"ngram_size": "3"}, "ngram_size must be an integer"),
    ({"draft_cost": -0.1}, "draft_cost must be a number in [0, 1]"),
    ({"draft_cost": 1.5}, "draft_cost must be a number in [0, 1]"),
    ({"draft_cost": "low"}, "draft_cost must be a number in [0, 1]"),
    ({"draft_cost": True}, "draft_cost must be a number in [0, 1]"),
])
def test_bad_speculative_options_are_refused(tiny_qwen2, kwargs, words):
    with pytest.raises(InvalidRequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
        LlamaGenerator(tiny_qwen2, n_ctx=256, **kwargs)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                 st.booleans(), st.text(max_size=3), st.none()))
def test_draft_cost_is_taken_exactly_when_it_is_a_share_of_a_step(value):
    from tongyi_local.backends.llama import _speculative_config

    valid = (isinstance(value, (int, float)) and not isinstance(value, bool)
             and 0 <= value <= 1)
    if valid:
        assert _speculative_config("ngram", 3, 8, value).draft_cost == float(value)
    else:
        with pytest.raises(InvalidRequestError, match="draft_cost must be a number in"):
            _speculative_config("ngram", 3, 8, value)


def test_speculation_is_on_by_default_and_can_be_left_out_at_load(tiny_qwen2):
    with LlamaGenerator(tiny_qwen2, n_ctx=256) as gen:
        assert gen.speculative == "ngram"
    with LlamaGenerator(tiny_qwen2, n_ctx=256, speculative=None) as gen:
        assert gen.speculative is None
        with pytest.raises(InvalidRequestError, match="speculative='ngram'"):
            gen.speculative = "ngram"
        done = gen.complete(REPEATING[0], max_tokens=20, ignore_eos=True, **GREEDY)
    assert done.timings.draft_tokens == 0


# --- how many tokens to draft --------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 8)),
                min_size=1, max_size=4),
       st.floats(0, 1), st.floats(0, 1), st.integers(0, 40))
def test_a_dearer_draft_token_never_lengthens_a_draft(requests, cost_a, cost_b, room):
    low, high = sorted((cost_a, cost_b))
    drafters, candidates = [], []
    for accepted, rejected, length in requests:
        drafter = Drafter(SpeculativeConfig(), [])
        drafter.accepted, drafter.rejected = accepted + 0.5, rejected + 0.5
        drafters.append(drafter)
        candidates.append(list(range(length)))
    cheap = allocate(drafters, candidates, len(requests), low, room)
    dear = allocate(drafters, candidates, len(requests), high, room)
    assert all(d <= c <= len(cand) for d, c, cand in zip(dear, cheap, candidates))
    assert sum(cheap) <= room
    if low == 0:  # free drafts: every token with a chance of use goes in, room allowing
        assert sum(cheap) == min(room, sum(len(c) for c in candidates))


def test_drafts_follow_acceptance_not_the_clock(starter_path):
    """Draft lengths depend on the tokens alone: two processes' worth of generators give the
    same greedy text and the same draft counts on a model whose kernels round a batch of rows
    differently from one row (the starter's Q4_K/Q5_0/Q8_0), at a context past 512 cells."""
    prompt = " ".join(f"item {i % 17} costs {i % 5} coins;" for i in range(70))
    runs = []
    for _ in range(2):
        with LlamaGenerator(starter_path, n_ctx=1024, slots=1, disk_prefix_cache=False) as gen:
            assert len(gen.tokenize(prompt)) > 520
            done = gen.complete(prompt, max_tokens=32, ignore_eos=True, **GREEDY)
        runs.append((done.text, done.timings.draft_tokens, done.timings.accepted_tokens))
    assert runs[0] == runs[1]
    assert runs[0][1] > 0  # drafting happened at the default draft cost
