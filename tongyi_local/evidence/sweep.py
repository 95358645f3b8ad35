"""Thread sweep, pinned vs unpinned, and preset comparison, each as ratios against the default.

Why ratios: absolute tokens/s depend on the model and the machine; what a reader must decide
(how many threads, whether to pin, which build) is answered by "x times the default".
The default is what the library does on its own: the thread plan's count, pinned as planned,
built with the preset the setup chose.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from .speed import DEFAULT_MIX, SpeedRow, run_isolated


@dataclass(frozen=True)
class SweepPoint:
    label: str
    threads: int
    pinned: bool
    prompt_tps: float
    decode_tps: float
    prompt_ratio: float  # against the default point
    decode_ratio: float
    is_default: bool = False


def thread_counts(physical: int, logical: int) -> list[int]:
    """1 … physical cores, then the logical count (SMT) when it is larger."""
    counts = list(range(1, physical + 1))
    if logical > physical:
        counts.append(logical)
    return counts


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _points(rows: list[tuple[str, SpeedRow]], default: SpeedRow) -> list[SweepPoint]:
    return [SweepPoint(label=label, threads=r.threads, pinned=r.pinned, prompt_tps=r.prompt_tps,
                       decode_tps=r.decode_tps,
                       prompt_ratio=_ratio(r.prompt_tps, default.prompt_tps),
                       decode_ratio=_ratio(r.decode_tps, default.decode_tps),
                       is_default=r is default)
            for label, r in rows]


def thread_sweep(path: str | Path, *, mix=DEFAULT_MIX, rounds: int = 1,
                 n_ctx: int = 2048) -> list[SweepPoint]:
    """Each thread count pinned and unpinned, in its own process; ratios against the plan's default."""
    from .. import hardware

    plan = hardware.this_machine_plan()
    rows: list[tuple[str, SpeedRow]] = []
    default = run_isolated(path, mix=mix, rounds=rounds, n_ctx=n_ctx)
    rows.append((f"default ({plan.threads} threads)", default))
    for n in thread_counts(plan.usable_physical_cores, plan.usable_logical_cpus):
        for pin in (True, False):
            rows.append((f"{n} threads {'pinned' if pin else 'unpinned'}",
                         run_isolated(path, threads=n, pin=pin, mix=mix, rounds=rounds,
                                      n_ctx=n_ctx)))
    return _points(rows, default)


@dataclass(frozen=True)
class PresetPoint:
    preset: str
    pp_tps: float
    tg_tps: float
    pp_ratio: float
    tg_ratio: float
    is_default: bool
    build_commit: str


def preset_comparison(model: str | Path, *, presets: tuple[str, ...] = ("zen4", "avx2", "native"),
                      threads: int | None = None, pp: int = 512, tg: int = 128,
                      rounds: int = 3) -> list[PresetPoint]:
    """llama-bench builds of each preset (same source), interleaved rounds, medians; ratios
    against the installed preset. Presets the CPU cannot run are skipped by the caller."""
    from .. import build, hardware
    from .tools import llama_bench

    available = build.load_presets()
    default = (build.installed_build() or {}).get("preset") or build.choose_preset(
        hardware.read_topology().flags)
    names = [p for p in presets if p in available]
    if default not in names and default in available:
        names.insert(0, default)
    bins = {n: build.build_tools(available[n])["llama-bench"] for n in names}
    n_threads = threads or hardware.this_machine_plan().threads
    runs: dict[str, dict[str, list[float]]] = {n: {"pp": [], "tg": []} for n in names}
    commits: dict[str, str] = {}
    for i in range(rounds):
        for name in names if i % 2 == 0 else list(reversed(names)):
            r = llama_bench(bins[name], Path(model), threads=n_threads, pp=pp, tg=tg)
            runs[name]["pp"].append(float(r[f"pp{pp}"]))
            runs[name]["tg"].append(float(r[f"tg{tg}"]))
            commits[name] = str(r["build_commit"])
    med = {n: (statistics.median(v["pp"]), statistics.median(v["tg"])) for n, v in runs.items()}
    base = med.get(default) or next(iter(med.values()))
    return [PresetPoint(preset=n, pp_tps=pp_, tg_tps=tg_, pp_ratio=_ratio(pp_, base[0]),
                        tg_ratio=_ratio(tg_, base[1]), is_default=n == default,
                        build_commit=commits[n])
            for n, (pp_, tg_) in med.items()]
