"""Role prefixes' KV state on disk: saved by one process, restored by the next, never trusted when
it does not match. Real llama.cpp on the packaged chat model (SmolLM2-135M-Instruct), real
subprocesses for the cross-process cases and the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tongyi_local.backends import prefix_store
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.backends.prefix_store import (
    PrefixCacheSettings, PrefixKey, PrefixStore, StateFileError, encode_header,
    parse_header_bytes, read_state)

SYSTEM = ("You are the reviewer agent. Check every diff for error handling, input validation, "
          "logging hygiene, SQL parameterisation and thread safety. Answer in one short line. ") * 3
QUESTION = "What is 2 + 2?"
MIN_TOKENS = 32  # the test prompt's system turn is ~100 tokens; the default minimum is 256
ASK = {"temperature": 0, "max_tokens": 8}

RUN = """
import json, sys
from pathlib import Path
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.backends.prefix_store import PrefixCacheSettings
model, directory, system, question = sys.argv[1:5]
gen = LlamaGenerator(model, n_ctx=512, slots=1, disk_prefix_cache=PrefixCacheSettings(
    directory=Path(directory), max_bytes=1 << 30, min_tokens=32))
r = gen.chat([{"role": "system", "content": system}, {"role": "user", "content": question}],
             temperature=0, max_tokens=8)
gen.close()
print(json.dumps({"text": r.text, "cached": r.usage.cached_prompt_tokens,
                  "prompt": r.usage.prompt_tokens}))
"""


def _settings(directory: Path, **over: object) -> PrefixCacheSettings:
    return PrefixCacheSettings(directory=directory, **{"max_bytes": 1 << 30,
                                                        "min_tokens": MIN_TOKENS, **over})


def _ask(gen: LlamaGenerator, question: str = QUESTION):
    return gen.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                    **ASK)


def _run(model: Path, directory: Path, n_ctx: int = 512, build: str | None = None,
         question: str = QUESTION):
    gen = LlamaGenerator(model, n_ctx=n_ctx, slots=1, disk_prefix_cache=_settings(directory))
    try:
        if build is not None:
            gen.prefix_store.key = dataclasses.replace(gen.prefix_store.key, build=build)
        return _ask(gen, question)
    finally:
        gen.close()


def _state_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{prefix_store.SUFFIX}"))


def _process(model: Path, directory: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(model), str(directory), SYSTEM,
                             QUESTION], stdout=subprocess.PIPE, text=True)


def _answer(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uncached(chat_model_path, tmp_path_factory):
    """The reference answer: the cache's first request (nothing on disk yet), and its file."""
    directory = tmp_path_factory.mktemp("kv-reference")
    first = _run(chat_model_path, directory)
    assert first.usage.cached_prompt_tokens == 0
    (path,) = _state_files(directory)
    return first, path


# --- across processes --------------------------------------------------------------------------
def test_a_fresh_process_restores_the_role_prefix_and_answers_the_same(chat_model_path, tmp_path):
    first = _answer(_process(chat_model_path, tmp_path))
    assert first["cached"] == 0
    (path,) = _state_files(tmp_path)
    with open(path, "rb") as f:
        prefix = len(prefix_store.parse_header(f).tokens)
    assert MIN_TOKENS <= prefix < first["prompt"]

    second = _answer(_process(chat_model_path, tmp_path))
    assert second["cached"] == prefix
    assert second["text"] == first["text"]


def test_concurrent_processes_writing_the_same_key_leave_one_valid_file(chat_model_path,
                                                                         tmp_path):
    procs = [_process(chat_model_path, tmp_path) for _ in range(2)]
    answers = [_answer(p) for p in procs]
    assert answers[0]["text"] == answers[1]["text"]
    (path,) = _state_files(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    with open(path, "rb") as f:
        header = prefix_store.parse_header(f)
    read_state(path, header.key, list(header.tokens))  # complete, checksum intact
    third = _answer(_process(chat_model_path, tmp_path))
    assert third["cached"] == len(header.tokens) and third["text"] == answers[0]["text"]


# --- in one process: what may not be used ------------------------------------------------------
def test_the_same_prefix_in_another_generator_is_restored(chat_model_path, uncached, tmp_path):
    first, path = uncached
    shutil.copy(path, tmp_path / path.name)
    again = _run(chat_model_path, tmp_path, question="Name a prime number.")
    assert again.usage.cached_prompt_tokens > MIN_TOKENS


def test_a_state_of_another_model_file_is_not_used(chat_model_path, uncached, tmp_path):
    _, path = uncached
    shutil.copy(path, tmp_path / path.name)
    copy = tmp_path / "copy.gguf"  # the same bytes under another path: another key
    shutil.copy(chat_model_path, copy)
    assert _run(copy, tmp_path).usage.cached_prompt_tokens == 0


def test_a_state_of_another_build_or_n_ctx_is_not_used(chat_model_path, uncached, tmp_path):
    first, path = uncached
    shutil.copy(path, tmp_path / path.name)
    other_build = _run(chat_model_path, tmp_path, build="0000000")
    assert other_build.usage.cached_prompt_tokens == 0
    other_ctx = _run(chat_model_path, tmp_path, n_ctx=1024)
    assert other_ctx.usage.cached_prompt_tokens == 0
    assert other_build.text == first.text


def test_a_file_whose_header_names_another_build_is_removed(chat_model_path, uncached, tmp_path,
                                                            caplog):
    """A state written for another build but found under this key's name (renamed, or a digest
    collision): the header check refuses it before llama.cpp sees it."""
    first, path = uncached
    gen = LlamaGenerator(chat_model_path, n_ctx=512, slots=1,
                         disk_prefix_cache=_settings(tmp_path))
    try:
        with open(path, "rb") as f:
            header = prefix_store.parse_header(f)
            payload = f.read()
        foreign = dataclasses.replace(header.key, build="0000000")
        target = gen.prefix_store.path_for(list(header.tokens))
        target.write_bytes(encode_header(foreign, header.tokens, payload) + payload)
        with caplog.at_level(logging.DEBUG, logger="tongyi_local.kv_cache"):
            answer = _ask(gen)
    finally:
        gen.close()
    assert answer.usage.cached_prompt_tokens == 0 and answer.text == first.text
    assert "another model file, build" in caplog.text
    with open(target, "rb") as f:  # replaced by this build's own state
        assert prefix_store.parse_header(f).key == gen.prefix_store.key


def _half_payload(data: bytes) -> bytes:
    header = parse_header_bytes(data)
    payload = data[header.size:][:header.payload_len // 2]
    return encode_header(header.key, header.tokens, payload) + payload


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[:len(data) // 2], "payload length"),
    (lambda data: data[:40], "ends inside its header"),
    (lambda data: os.urandom(len(data)), "not a tongyi_local state file"),
    (lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "checksum"),
    (_half_payload, "error loading state"),  # header and checksum fine, llama.cpp refuses the state
], ids=["truncated", "truncated-header", "random", "checksum", "refused-by-llama"])
def test_a_damaged_file_is_ignored_removed_and_the_request_still_answers(
        chat_model_path, uncached, tmp_path, caplog, damage, reason):
    first, path = uncached
    target = tmp_path / path.name
    target.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.DEBUG, logger="tongyi_local.kv_cache"):
        answer = _run(chat_model_path, tmp_path)
    assert answer.usage.cached_prompt_tokens == 0
    assert answer.text == first.text
    removed = [r.getMessage() for r in caplog.records if "ignored and removed" in r.getMessage()]
    assert len(removed) == 1 and reason in removed[0]
    assert SYSTEM[:20] not in caplog.text and QUESTION not in caplog.text
    (again,) = _state_files(tmp_path)  # the request saved a good state in its place
    with open(again, "rb") as f:
        header = prefix_store.parse_header(f)
    read_state(again, header.key, list(header.tokens))


def test_short_system_prompts_and_plain_prompts_keep_no_file(chat_model_path, tmp_path):
    gen = LlamaGenerator(chat_model_path, n_ctx=512, slots=1,
                         disk_prefix_cache=_settings(tmp_path, min_tokens=256))
    try:
        _ask(gen)
        gen.complete(SYSTEM, **ASK)
    finally:
        gen.close()
    assert not _state_files(tmp_path)


def test_the_disk_cache_can_be_turned_off(chat_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv(prefix_store.DIR_ENV, str(tmp_path))
    monkeypatch.delenv(prefix_store.BYTES_ENV)
    gen = LlamaGenerator(chat_model_path, n_ctx=512, slots=1, disk_prefix_cache=False)
    assert gen.prefix_store is None
    gen.close()
    monkeypatch.setenv(prefix_store.BYTES_ENV, "0")
    gen = LlamaGenerator(chat_model_path, n_ctx=512, slots=1)
    assert gen.prefix_store is None
    gen.close()
    monkeypatch.delenv(prefix_store.BYTES_ENV)
    gen = LlamaGenerator(chat_model_path, n_ctx=512, slots=1)
    assert gen.prefix_store is not None and gen.prefix_store.directory == tmp_path
    gen.close()


# --- the directory: LRU bound, listing, clearing -----------------------------------------------
KEY = PrefixKey("/models/m.gguf", 1, 2, "abc", 512, "f16")


def test_lru_eviction_keeps_the_total_under_the_cap(tmp_path):
    store = PrefixStore(KEY, PrefixCacheSettings(directory=tmp_path, max_bytes=250_000))
    payload = bytes(100_000)
    for i in range(2):
        store.save([i] * 8, payload)
        store.wait()
    old = time.time() - 100
    os.utime(store.path_for([0] * 8), (old, old))
    os.utime(store.path_for([1] * 8), (old + 10, old + 10))
    assert store.load([0] * 8) == payload  # used now: most recent
    store.save([2] * 8, payload)
    store.wait()
    total = sum(p.stat().st_size for p in _state_files(tmp_path))
    assert total <= 250_000
    assert store.path_for([0] * 8).exists() and store.path_for([2] * 8).exists()
    assert not store.path_for([1] * 8).exists()


def test_a_state_larger_than_the_cap_is_not_written(tmp_path):
    store = PrefixStore(KEY, PrefixCacheSettings(directory=tmp_path, max_bytes=1000))
    store.save([1, 2, 3], bytes(2000))
    store.wait()
    assert not _state_files(tmp_path)


def test_cache_ls_and_clear(tmp_path):
    store = PrefixStore(KEY, PrefixCacheSettings(directory=tmp_path, max_bytes=1 << 20))
    store.save(list(range(300)), b"x" * 5000)
    store.wait()
    (tmp_path / f"{'0' * 64}{prefix_store.SUFFIX}").write_bytes(b"junk")
    env = {**os.environ, prefix_store.DIR_ENV: str(tmp_path)}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "tongyi_local", "cache", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows = json.loads(cli("ls", "--json"))
    assert {(r["model"], r["tokens"]) for r in rows} == {("m.gguf", 300), ("?", 0)}
    assert {r["key"] for r in rows} >= {KEY.digest(list(range(300)))}
    assert "2 file(s)" in cli("ls")
    assert "removed 2 file(s)" in cli("clear")
    assert not list(tmp_path.iterdir())
    assert json.loads(cli("ls", "--json")) == []


# --- the header parser -------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_to_a_header_or_a_clean_rejection(data):
    try:
        header = parse_header_bytes(data)
    except StateFileError:
        return
    assert header.size <= len(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), max_size=50), st.binary(max_size=64),
       st.text(max_size=20), st.integers(0, 2**40))
def test_a_written_header_parses_back(tokens, payload, build, n_ctx):
    key = dataclasses.replace(KEY, build=build, n_ctx=n_ctx)
    data = encode_header(key, tokens, payload) + payload
    header = parse_header_bytes(data)
    assert (header.key, list(header.tokens), header.payload_len) == (key, tokens, len(payload))
    assert data[header.size:] == payload
    for cut in range(0, header.size, 7):  # every truncation of the header is a clean rejection
        with pytest.raises(StateFileError):
            parse_header_bytes(data[:cut])
