"""Speed of one model file on this machine, measured through the public API.

Why a subprocess per configuration: load time, peak RSS and thread pinning are properties of a
process (pinning changes the process's affinity for good), so each model × threads × pinning row
is measured in a fresh interpreter (``run_isolated``) and cannot leak into the next.
Every row carries a ``Stamp`` (CPU, preset, llama.cpp commit, thread plan) so figures from
different machines or builds are never compared unknowingly.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EvidenceError
from .jsonio import parse, to_json

# (label, prompt length in characters of corpus text, tokens to generate). Every prompt starts
# with a distinct request number, so no request reuses another's cached prompt prefix.
DEFAULT_MIX: tuple[tuple[str, int, int], ...] = (
    ("chat", 200, 48), ("rag", 1600, 32), ("long", 2400, 16), ("chat", 300, 64),
    ("code", 800, 48), ("chat", 150, 32),
)
_FILLER = ("Measurement is the quiet foundation of engineering. A bridge is not designed from a "
           "feeling about steel; it is designed from tested loads, known margins and careful "
           "records. ")


@dataclass(frozen=True)
class Stamp:
    """Where and with what a figure was measured."""

    cpu: str
    physical_cores: int
    logical_cpus: int
    preset: str
    llama_cpp_commit: str
    threads: int
    batch_threads: int
    pinned_cpus: tuple[int, ...] | None
    plan_notes: tuple[str, ...] = ()
    python: str = field(default_factory=platform.python_version)


def stamp(threads: int | None = None, pin: bool = True) -> Stamp:
    from .. import build, hardware
    from ..backends.runtime import build_commit

    topo = hardware.read_topology()
    plan = hardware.this_machine_plan(threads=threads, pin=pin)
    record = build.installed_build() or {}
    return Stamp(cpu=topo.model_name, physical_cores=topo.physical_cores,
                 logical_cpus=topo.logical_cpus, preset=record.get("preset", "unknown"),
                 llama_cpp_commit=build_commit(), threads=plan.threads,
                 batch_threads=plan.batch_threads, pinned_cpus=plan.pin_cpus,
                 plan_notes=plan.notes)


@dataclass(frozen=True)
class SpeedRow:
    model: str
    path: str
    file_type: str
    size_bytes: int
    n_params: int
    threads: int
    pinned: bool
    requests: int
    load_ms: float
    prompt_tps: float
    decode_tps: float
    ttft_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    peak_rss_mib: float
    cpu_utilisation: float  # CPU time / (wall time x threads) over the request mix
    stamp: Stamp


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _prompt(index: int, chars: int) -> str:
    head = f"Request {index}: summarise the text below.\n"
    body = (_FILLER * (chars // len(_FILLER) + 1))[:max(0, chars - len(head))]
    return head + body


def measure(path: str | Path, *, threads: int | None = None, pin: bool = True, n_ctx: int = 2048,
            mix: tuple[tuple[str, int, int], ...] = DEFAULT_MIX, rounds: int = 2,
            name: str | None = None) -> SpeedRow:
    """Load ``path`` and run the request mix ``rounds`` times in this process (after a warm-up)."""
    import psutil

    import tongyi_local
    from ..gguf_header import read_header

    header = read_header(path)
    started = time.perf_counter()
    gen = tongyi_local.load(header.path, n_ctx=n_ctx, threads=threads, pin_threads=pin)
    load_ms = (time.perf_counter() - started) * 1e3
    proc = psutil.Process()
    try:
        gen.complete(_prompt(0, 100), max_tokens=4, temperature=0)  # warm-up, as llama-bench does
        latencies, ttfts, decode = [], [], []
        prompt_tokens = prompt_ms = 0.0
        cpu_before, wall_before = sum(proc.cpu_times()[:2]), time.perf_counter()
        index = 1
        for _ in range(rounds):
            for _label, chars, max_tokens in mix:
                t0 = time.perf_counter()
                c = gen.complete(_prompt(index, chars), max_tokens=max_tokens, temperature=0,
                                 ignore_eos=True)
                latencies.append((time.perf_counter() - t0) * 1e3)
                index += 1
                ttfts.append(c.timings.ttft_ms)
                if c.timings.decode_tokens:
                    decode.append(c.timings.decode_tokens_per_s)
                prompt_tokens += c.timings.prompt_eval_tokens
                prompt_ms += c.timings.prompt_eval_ms
        wall = time.perf_counter() - wall_before
        cpu = sum(proc.cpu_times()[:2]) - cpu_before
    finally:
        gen.close()
    st = stamp(threads, pin)
    return SpeedRow(
        model=name or header.path.stem, path=str(header.path), file_type=header.file_type,
        size_bytes=header.size_bytes, n_params=header.n_params, threads=st.threads, pinned=bool(st.pinned_cpus),
        requests=len(latencies), load_ms=load_ms,
        prompt_tps=prompt_tokens / prompt_ms * 1e3 if prompt_ms else 0.0,
        decode_tps=statistics.median(decode) if decode else 0.0,
        ttft_ms=statistics.median(ttfts), latency_p50_ms=percentile(latencies, 50),
        latency_p90_ms=percentile(latencies, 90), latency_p99_ms=percentile(latencies, 99),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        cpu_utilisation=cpu / (wall * st.threads) if wall else 0.0, stamp=st)


@dataclass(frozen=True)
class _Job:
    """What ``run_isolated`` asks its child process to measure."""

    path: str
    threads: int | None
    pin: bool
    n_ctx: int
    mix: tuple[tuple[str, int, int], ...]
    rounds: int
    name: str | None


def run_isolated(path: str | Path, *, threads: int | None = None, pin: bool = True,
                 n_ctx: int = 2048, mix: tuple[tuple[str, int, int], ...] = DEFAULT_MIX,
                 rounds: int = 2, name: str | None = None, timeout: float = 3600) -> SpeedRow:
    """``measure`` in a fresh interpreter: clean load time, peak RSS and affinity per row.

    The child runs this module from the installed package (``python -m``, same interpreter and
    environment), so it needs no source checkout.
    """
    job = _Job(path=str(path), threads=threads, pin=pin, n_ctx=n_ctx, mix=mix, rounds=rounds,
               name=name)
    try:
        run = subprocess.run([sys.executable, "-m", "tongyi_local.evidence.speed",
                              json.dumps(to_json(job))],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EvidenceError(f"speed run of {Path(path).name} took over {timeout:.0f} s")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        tail = "\n".join(run.stderr.splitlines()[-5:])
        raise EvidenceError(f"speed run of {Path(path).name} failed (exit {run.returncode}): {tail}")
    return parse(SpeedRow, json.loads(lines[-1]), f"the speed run of {Path(path).name}",
                 "the child printed a row this version cannot read")


def _worker(argv: list[str]) -> int:
    from ..errors import TongyiError

    try:
        job = parse(_Job, json.loads(argv[0]), "the speed job", "run it through run_isolated")
        row = measure(job.path, threads=job.threads, pin=job.pin, n_ctx=job.n_ctx, mix=job.mix,
                      rounds=job.rounds, name=job.name)
    except TongyiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(row)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
