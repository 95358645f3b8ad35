"""The pool on real llama.cpp loads of tiny Qwen GGUFs: sharing, budget, LRU, keep-alive."""

from __future__ import annotations

import threading
import time

import pytest

from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.errors import InsufficientMemoryError, ModelNotFoundError
from tongyi_local.pool import ModelPool, processes_status

MB = 1 << 20


class Loads:
    """A real loader (LlamaGenerator) that counts what it loaded."""

    def __init__(self):
        self.paths: list[str] = []

    def __call__(self, path):
        self.paths.append(str(path))
        return LlamaGenerator(path, n_ctx=256)


def make_pool(tmp_path, budget, sizes, keep_alive=None):
    loads = Loads()
    pool = ModelPool(loads, lambda path: sizes[str(path)], budget_bytes=budget,
                     keep_alive_s=keep_alive, status_dir=tmp_path / "run")
    return pool, loads


def ask(pool, path, role=None):
    with pool.checkout(str(path), path, path.stem, role) as gen:
        return gen.complete("hello world", temperature=0, max_tokens=2, ignore_eos=True)


def test_same_key_loads_once_and_records_roles(tmp_path, tiny_qwen2):
    pool, loads = make_pool(tmp_path, 100 * MB, {str(tiny_qwen2): 10 * MB})
    ask(pool, tiny_qwen2, "coder")
    ask(pool, tiny_qwen2, "tester")
    assert loads.paths == [str(tiny_qwen2)]
    (row,) = pool.ps()
    assert row.roles == ("coder", "tester") and row.memory_bytes == 10 * MB and row.in_flight == 0
    assert processes_status(tmp_path / "run")[0]["models"][0]["roles"] == ["coder", "tester"]
    pool.close()
    assert processes_status(tmp_path / "run") == []


def test_small_budget_evicts_the_least_recently_used_idle_model(tmp_path, tiny_qwen2,
                                                                 tiny_qwen3moe):
    third = tmp_path / "third.gguf"
    third.write_bytes(tiny_qwen2.read_bytes())
    sizes = {str(tiny_qwen2): 40 * MB, str(tiny_qwen3moe): 40 * MB, str(third): 40 * MB}
    pool, loads = make_pool(tmp_path, 90 * MB, sizes)
    ask(pool, tiny_qwen2)
    ask(pool, tiny_qwen3moe)
    ask(pool, tiny_qwen2)          # qwen3moe is now the least recently used
    ask(pool, third)               # needs room: evicts qwen3moe, keeps qwen2
    assert {r.name for r in pool.ps()} == {tiny_qwen2.stem, "third"}
    assert pool.used_bytes() == 80 * MB
    ask(pool, tiny_qwen3moe)       # reloads, evicting qwen2 (LRU now)
    assert loads.paths.count(str(tiny_qwen3moe)) == 2
    pool.close()


def test_busy_models_are_not_evicted(tmp_path, tiny_qwen2, tiny_qwen3moe):
    sizes = {str(tiny_qwen2): 60 * MB, str(tiny_qwen3moe): 60 * MB}
    pool, _ = make_pool(tmp_path, 100 * MB, sizes)
    with pool.checkout(str(tiny_qwen2), tiny_qwen2, "qwen2"):
        with pytest.raises(InsufficientMemoryError, match="held by models serving requests"):
            ask(pool, tiny_qwen3moe)
    ask(pool, tiny_qwen3moe)  # once idle, qwen2 makes way
    pool.close()


def test_a_model_too_big_for_the_budget_fails_clearly(tmp_path, tiny_qwen2):
    pool, loads = make_pool(tmp_path, 50 * MB, {str(tiny_qwen2): 3 << 30})
    with pytest.raises(InsufficientMemoryError) as info:
        ask(pool, tiny_qwen2)
    assert "3.00 GiB" in str(info.value) and "0.05 GiB" in str(info.value)
    assert loads.paths == [] and pool.ps() == []


def test_failed_load_releases_its_reservation(tmp_path):
    missing = tmp_path / "absent.gguf"
    pool, _ = make_pool(tmp_path, 100 * MB, {str(missing): 10 * MB})
    with pytest.raises(ModelNotFoundError):
        ask(pool, missing)
    assert pool.used_bytes() == 0 and pool.ps() == []


def test_idle_models_unload_after_keep_alive(tmp_path, tiny_qwen2):
    pool, _ = make_pool(tmp_path, 100 * MB, {str(tiny_qwen2): 10 * MB}, keep_alive=0.3)
    ask(pool, tiny_qwen2)
    assert len(pool.ps()) == 1
    deadline = time.monotonic() + 10
    while pool.ps() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.ps() == []  # the reaper unloaded it without another call
    pool.close()


def test_threads_asking_for_different_models_at_once(tmp_path, tiny_qwen2, tiny_qwen3moe):
    sizes = {str(tiny_qwen2): 10 * MB, str(tiny_qwen3moe): 10 * MB}
    pool, loads = make_pool(tmp_path, 100 * MB, sizes)
    expected = {p: ask(pool, p).text for p in (tiny_qwen2, tiny_qwen3moe)}
    results, errors = [], []

    def worker(path):
        try:
            for _ in range(3):
                results.append((path, ask(pool, path).text))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (tiny_qwen2, tiny_qwen3moe) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 18
    assert all(text == expected[path] for path, text in results)
    assert sorted(loads.paths) == sorted({str(tiny_qwen2), str(tiny_qwen3moe)})
    pool.close()
