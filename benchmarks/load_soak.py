"""Load and soak: many threads and asyncio streams on shared models, then thousands of mixed
requests on one model, with resources measured before and after.

    .venv/bin/python benchmarks/load_soak.py --short          # CI size (tests/test_load_soak.py)
    .venv/bin/python benchmarks/load_soak.py                  # 8 x 100 load, 2,000-request soak

- ``load``: 8 threads x N requests mixing three roles over two models (two roles share one
  model), greedy, each thread bounded in time: requests served, errors, how many greedy texts
  differ from the same request run alone (llama.cpp's kernels are not batch-invariant), and the
  same again with ``deterministic=True`` (0 expected) with both throughputs. Then 50 concurrent
  asyncio streams with random cancellations: all slots free afterwards, the model still answers.
- ``soak``: N requests on one model: short and long completions, streams abandoned half-way,
  cancelled asyncio requests, context overflows; RSS, threads and open file descriptors after
  warm-up and at the end.
Figures are printed, never asserted here (the test asserts on the short run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import tongyi_local
from tongyi_local.config import load_config
from tongyi_local.errors import ContextOverflowError
from tongyi_local.pool import ModelPool
from tongyi_local.registry import Registry, estimate_model, load_model, pool_key
from tongyi_local.testing import write_tiny_model

PROMPTS = ["The history of the printing press", "A recipe for bread starts with",
           "In distributed systems, consensus", "The largest desert on Earth",
           "Photosynthesis converts", "def fibonacci(n):", "Dear team, the release",
           "Three reasons to test code"]
ROLES = ("coder", "tester", "reviewer")


@dataclass
class LoadReport:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    differing: int = 0
    deterministic_requests: int = 0
    deterministic_differing: int = 0
    deterministic_seconds: float = 0.0
    deadlocked: bool = False
    streams: int = 0
    cancelled: int = 0
    slots_busy_after: int = 0
    usable_after: bool = False

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def deterministic_requests_per_s(self) -> float:
        return (self.deterministic_requests / self.deterministic_seconds
                if self.deterministic_seconds else 0.0)


@dataclass
class SoakReport:
    requests: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0
    threads_warm: int = 0
    threads_end: int = 0
    fds_warm: int = 0
    fds_end: int = 0
    seconds: float = 0.0

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_warm_mib


def registry_for(chat_model: Path, second_model: Path, home: Path) -> Registry:
    """coder and tester share the chat model; reviewer runs on a second model."""
    config = home / "models.toml"
    config.write_text(f"""
[models.chat]
source = "path"
path = "{chat_model}"
context_length = 1024

[models.second]
source = "path"
path = "{second_model}"
context_length = 1024

[roles.coder]
model = "chat"
system_prompt = "You write Python."

[roles.tester]
model = "chat"
system_prompt = "You write tests."

[roles.reviewer]
model = "second"
""")
    return Registry(load_config(config), pool=ModelPool(load_model, estimate_model,
                                                        budget_bytes=16 << 30,
                                                        status_dir=home / "run"))


def _request(registry: Registry, role: str, prompt: str, max_tokens: int,
             deterministic: bool) -> str:
    generator = registry.for_role(role)
    return generator.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                          temperature=0, deterministic=deterministic).text


def _hammer(registry: Registry, threads: int, per_thread: int, max_tokens: int,
            deterministic: bool, timeout_s: float,
            prompts: list[str]) -> tuple[list[tuple[str, str, str]], list[str], float, bool]:
    results: list[tuple[str, str, str]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for i in range(per_thread):
            role, prompt = ROLES[(k + i) % len(ROLES)], prompts[(k * 7 + i) % len(prompts)]
            try:
                text = _request(registry, role, prompt, max_tokens, deterministic)
                with lock:
                    results.append((role, prompt, text))
            except Exception as exc:  # noqa: BLE001 - counted and printed
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

    start = time.perf_counter()
    pool = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    deadline = start + timeout_s
    for t in pool:
        t.join(max(0.0, deadline - time.perf_counter()))
    stuck = any(t.is_alive() for t in pool)
    return results, errors, time.perf_counter() - start, stuck


def run_load(registry: Registry, *, threads: int = 8, per_thread: int = 100,
             max_tokens: int = 12, streams: int = 50, timeout_s: float = 1800.0,
             seed: int = 0, n_prompts: int = len(PROMPTS)) -> LoadReport:
    """``n_prompts``: how many of PROMPTS the threads send (each is also run alone, twice)."""
    report = LoadReport()
    prompts = PROMPTS[:n_prompts]
    solo = {(r, p): _request(registry, r, p, max_tokens, False) for r in ROLES for p in prompts}
    results, errors, seconds, stuck = _hammer(registry, threads, per_thread, max_tokens, False,
                                              timeout_s, prompts)
    report.requests, report.errors, report.seconds = len(results), errors, seconds
    report.differing = sum(text != solo[(r, p)] for r, p, text in results)
    reference = {(r, p): _request(registry, r, p, max_tokens, True) for r in ROLES for p in prompts}
    results, errors, seconds, stuck_d = _hammer(registry, threads, per_thread, max_tokens, True,
                                                timeout_s, prompts)
    report.deterministic_requests, report.deterministic_seconds = len(results), seconds
    report.errors += errors
    report.deterministic_differing = sum(text != reference[(r, p)] for r, p, text in results)
    report.deadlocked = stuck or stuck_d
    _streams(registry, report, streams, seed)
    return report


def _streams(registry: Registry, report: LoadReport, n: int, seed: int) -> None:
    """n concurrent astreams on one role, about half cancelled at random moments."""
    rng = random.Random(seed)
    coder = registry.for_role("coder")

    async def one(i: int) -> None:
        async for _ in coder.astream([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     max_tokens=48, temperature=0.7, seed=i):
            pass

    async def main() -> int:
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        victims = rng.sample(range(n), n // 2)
        for i in victims:
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            tasks[i].cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 600)
        return sum(isinstance(d, asyncio.CancelledError) for d in done)

    report.streams = n
    report.cancelled = asyncio.run(main())
    spec = registry.config.models["chat"]
    with registry.pool.checkout(pool_key(spec), spec, spec.name, "coder") as model:
        end = time.monotonic() + 10
        while time.monotonic() < end and any(s.busy for s in model.slot_states()):
            time.sleep(0.05)
        report.slots_busy_after = sum(s.busy for s in model.slot_states())
    report.usable_after = bool(_request(registry, "coder", PROMPTS[0], 4, False) is not None)


def _resources() -> tuple[float, int, int]:
    gc.collect()
    proc = psutil.Process()
    return proc.memory_info().rss / 2**20, threading.active_count(), len(os.listdir("/proc/self/fd"))


def run_soak(model_path: Path, *, requests: int = 2000, warmup: int = 100,
             seed: int = 0) -> SoakReport:
    """Mixed traffic on one model; resources measured after ``warmup`` requests and at the end."""
    rng = random.Random(seed)
    report = SoakReport()
    long_prompt = " ".join(PROMPTS * 40)  # past n_ctx: a context overflow
    start = time.perf_counter()
    with tongyi_local.load(model_path, n_ctx=256, slots=4) as model:
        for i in range(requests):
            if i == warmup:
                report.rss_warm_mib, report.threads_warm, report.fds_warm = _resources()
            kind = rng.choice(("short", "short", "long", "abandon", "cancel", "overflow"))
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            prompt = rng.choice(PROMPTS)
            try:
                if kind == "short":
                    model.complete(prompt, max_tokens=rng.randint(1, 8), temperature=0.8,
                                   seed=i)
                elif kind == "long":
                    model.chat([{"role": "user", "content": prompt}], max_tokens=48,
                               temperature=0.8, seed=i)
                elif kind == "abandon":
                    stream = model.stream(prompt, max_tokens=64, temperature=0.8, seed=i)
                    for n, _ in enumerate(stream):
                        if n >= 3:
                            break
                    stream.close()
                elif kind == "cancel":
                    asyncio.run(_cancel_soon(model, prompt))
                else:
                    try:
                        model.complete(long_prompt, max_tokens=4)
                        report.errors.append("a prompt past n_ctx was accepted")
                    except ContextOverflowError:
                        pass
            except Exception as exc:  # noqa: BLE001 - counted and printed
                report.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])
            report.requests += 1
        report.rss_end_mib, report.threads_end, report.fds_end = _resources()
    report.seconds = time.perf_counter() - start
    return report


async def _cancel_soon(model: tongyi_local.Generator, prompt: str) -> None:
    task = asyncio.create_task(model.acomplete(prompt, max_tokens=64, ignore_eos=True))
    await asyncio.sleep(0.005)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def print_load(r: LoadReport) -> None:
    print(f"load: {r.requests} requests in {r.seconds:.1f} s ({r.requests_per_s:.1f}/s), "
          f"{len(r.errors)} errors, deadlock: {'yes' if r.deadlocked else 'no'}")
    print(f"  greedy texts differing from their solo run: {r.differing} of {r.requests}")
    print(f"  deterministic=True: {r.deterministic_differing} of {r.deterministic_requests} "
          f"differ, {r.deterministic_requests_per_s:.1f} requests/s "
          f"({r.deterministic_requests_per_s / r.requests_per_s if r.requests_per_s else 0:.2f}x"
          " the default's throughput)")
    print(f"  asyncio: {r.streams} streams, {r.cancelled} cancelled, slots busy after: "
          f"{r.slots_busy_after}, model usable after: {'yes' if r.usable_after else 'no'}")
    for e in r.errors[:10]:
        print(f"    {e}")


def print_soak(r: SoakReport) -> None:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items()))
    print(f"soak: {r.requests} requests in {r.seconds:.1f} s ({kinds}), {len(r.errors)} errors")
    print(f"  RSS {r.rss_warm_mib:.1f} -> {r.rss_end_mib:.1f} MiB (growth "
          f"{r.rss_growth_mib:+.1f} MiB after warm-up), threads {r.threads_warm} -> "
          f"{r.threads_end}, fds {r.fds_warm} -> {r.fds_end}")
    for e in r.errors[:10]:
        print(f"    {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI size")
    parser.add_argument("--sections", default="load,soak")
    args = parser.parse_args(argv)
    from tongyi_local.store import starter_chat_model

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        tiny = write_tiny_model(home / "tiny.gguf", "qwen2")
        chat = starter_chat_model()
        if "load" in args.sections:
            registry = registry_for(chat, tiny, home)
            try:
                print_load(run_load(registry, per_thread=10 if args.short else 100,
                                    streams=20 if args.short else 50))
            finally:
                registry.close()
        if "soak" in args.sections:
            print_soak(run_soak(tiny if args.short else chat,
                                requests=300 if args.short else 2000,
                                warmup=50 if args.short else 100))


if __name__ == "__main__":
    main()
