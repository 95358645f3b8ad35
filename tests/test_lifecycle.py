"""A closed model never touches freed memory, and text the tokenizer cannot take is a clear
error. Crashes are caught in child processes, so a regression fails one test, not the run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

import tongyi_local
from tongyi_local.errors import GeneratorClosedError, InvalidRequestError


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_every_public_method_after_close_is_a_clear_error(tiny_qwen2):
    model = tongyi_local.load(tiny_qwen2, n_ctx=256)
    model.close()
    calls = [lambda: model.tokenize("hi"), lambda: model.complete("hi"),
             lambda: model.chat([{"role": "user", "content": "hi"}]),
             lambda: model.stream("hi"), lambda: model.render_chat(()),
             lambda: asyncio.run(model.acomplete("hi")),
             lambda: asyncio.run(model.achat([{"role": "user", "content": "hi"}]))]
    for call in calls:
        with pytest.raises(GeneratorClosedError, match="closed"):
            call()
    model.close()  # twice is fine


def test_tokenize_racing_close_never_crashes(tiny_qwen2):
    done = _child(f"""
        import threading
        import tongyi_local
        from tongyi_local.errors import GeneratorClosedError
        for _ in range(20):
            model = tongyi_local.load({str(tiny_qwen2)!r}, n_ctx=256)
            errors = []
            def work():
                try:
                    for _ in range(200):
                        model.tokenize("hello world " * 20)
                except GeneratorClosedError:
                    pass
                except BaseException as exc:
                    errors.append(exc)
            threads = [threading.Thread(target=work) for _ in range(3)]
            for t in threads:
                t.start()
            model.close()
            for t in threads:
                t.join()
            assert not errors, errors
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(("prompt", "words"), [
    ("x\ud800y", "position 1"), ("", "empty"), ("   \n", "empty")])
def test_text_the_tokenizer_cannot_take_is_an_invalid_request(tiny_qwen2, prompt, words):
    with tongyi_local.load(tiny_qwen2, n_ctx=256) as model:
        with pytest.raises(InvalidRequestError, match=words):
            model.complete(prompt, max_tokens=2)
        if prompt.strip():  # a chat turn with blank content is a legitimate prompt
            with pytest.raises(InvalidRequestError, match="lone surrogate"):
                model.chat([{"role": "user", "content": prompt}], max_tokens=2)


@pytest.mark.parametrize("options", [{"max_tokens": True}, {"top_k": False}, {"seed": True}])
def test_booleans_are_not_numbers(options):
    with pytest.raises(InvalidRequestError, match=next(iter(options))):
        tongyi_local.Sampling(**options)


def test_ctrl_c_during_generation_leaves_the_model_usable(tiny_qwen2):
    done = _child(f"""
        import os, signal, threading
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if handed down ignored
        import tongyi_local
        model = tongyi_local.load({str(tiny_qwen2)!r}, n_ctx=8192)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            for _ in model.stream("hello", max_tokens=100000, ignore_eos=True, temperature=0):
                pass
            print("not interrupted")
        except KeyboardInterrupt:
            pass
        import gc, time
        gc.collect()
        deadline = time.time() + 10
        while time.time() < deadline and any(s.busy for s in model.slot_states()):
            time.sleep(0.05)
        assert not any(s.busy for s in model.slot_states())
        print(model.complete("hello", max_tokens=3, temperature=0).usage.completion_tokens)
        model.close()
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "3"


def test_an_unclosed_model_dropped_by_its_owner_is_freed(tiny_qwen2):
    import gc
    import threading

    def use_and_drop():
        model = tongyi_local.load(tiny_qwen2, n_ctx=256, name="dropped-model")
        model.complete("hello", max_tokens=2, temperature=0)
        return [t for t in threading.enumerate() if t.name.endswith("dropped-model")]

    (engine,) = use_and_drop()  # the model's engine thread, while the model was in use
    gc.collect()
    engine.join(timeout=10)
    assert not engine.is_alive()  # the finalizer closed the model: context and weights freed
