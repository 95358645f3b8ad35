"""The full evidence suite: speed, sweeps, presets, roofline, quality ladders, cross-check, role
tasks, cost -> report.md + pareto.png + figures.json.

    .venv/bin/python benchmarks/evidence.py                       # starter + tiny F16 ladder
    .venv/bin/python benchmarks/evidence.py --ladder Q8.gguf Q6_K.gguf Q4_K_M.gguf --no-builtin
    .venv/bin/python benchmarks/evidence.py --compare old/figures.json --out new/

Here it runs on the starter model (reference: its own Q4_K_M, against lower quantizations made
from it) and on a tiny random-weight model written at F16 (the ladder F16 -> Q8_0 -> Q6_K ->
Q5_K_M -> Q4_K_M). On a server, pass each real model's files as one --ladder: the reference is
the highest-precision file of each ladder. It prints figures and ratios; it asserts nothing.
The steps are ``tongyi_local.evidence.run_suite``'s (as for ``tongyi-local bench``); this program
only makes the built-in ladders, describes the plan and prints the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tongyi_local
from tongyi_local.backends import embeddings
from tongyi_local.backends.quantize import quantize
from tongyi_local.evidence.report import write_report
from tongyi_local.evidence.results import SuiteResult, load, save
from tongyi_local.evidence.suite import PRESETS, SuitePlan, conclude, ladder_of, run_suite
from tongyi_local.testing import write_tiny_model


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def builtin_ladders(work: Path) -> list[list[Path]]:
    """The starter with lower quantizations made from it, and the tiny F16 ladder."""
    starter = tongyi_local.starter_model_path()
    lower = [work / f"starter-{q}.gguf" for q in ("Q3_K_M", "Q2_K")]
    for path in lower:
        if not path.exists():
            say(f"quantizing the starter to {path.stem} (re-quantized from Q4_K_M)")
            quantize(starter, path, path.stem.split("-", 1)[1], allow_requantize=True)
    tiny = work / "tiny-F16.gguf"
    if not tiny.exists():
        write_tiny_model(tiny, "qwen2", n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536,
                         dtype="f16", context_length=4096, name="tiny-qwen2-f16")
    ladder = [tiny]
    for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"):
        out = work / f"tiny-{q}.gguf"
        if not out.exists():
            quantize(tiny, out, q)
        ladder.append(out)
    return [[starter, *lower], ladder]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ladder", nargs="+", action="append", type=Path, default=[],
                   help="GGUF files of one model at several quantizations (repeatable)")
    p.add_argument("--no-builtin", action="store_true", help="skip the starter and tiny ladders")
    p.add_argument("--out", type=Path, default=Path("evidence-report"))
    p.add_argument("--work", type=Path, help="where quantized files go (default: OUT/models)")
    p.add_argument("--threads", type=int, nargs="*", default=[], help="extra thread counts per model")
    p.add_argument("--rounds", type=int, default=2, help="passes over the request mix")
    p.add_argument("--quality-ctx", type=int, default=512)
    p.add_argument("--quality-chunks", type=int, default=8)
    p.add_argument("--iterations", type=int, default=3, help="runs per role task")
    p.add_argument("--presets", nargs="*", default=list(PRESETS),
                   help="presets to compare with llama-bench (none: skip)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--compare", type=Path, help="previous figures.json to flag regressions against")
    p.add_argument("--api-usd-per-1k", type=float, default=0.002)
    args = p.parse_args()

    work = args.work or args.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    ladders = ([] if args.no_builtin else builtin_ladders(work)) + [list(x) for x in args.ladder]
    if not ladders:
        raise SystemExit("nothing to measure: give --ladder files or drop --no-builtin")
    plan = SuitePlan(
        models=tuple(m for ladder in ladders for m in ladder), threads=(None, *args.threads),
        rounds=args.rounds, n_ctx=4096,
        roofline_only=(write_tiny_model(work / "tiny-qwen3moe.gguf", "qwen3moe", dtype="f16"),),
        sweep=not args.no_sweep, presets=tuple(args.presets),
        ladders=tuple(ladder_of(ladder) for ladder in ladders), quality_ctx=args.quality_ctx,
        quality_chunks=args.quality_chunks, crosscheck=True, task_models=tuple(ladders[0]),
        iterations=args.iterations, similarity=embeddings.available(),
        api_usd_per_1k_tokens=args.api_usd_per_1k)
    if not plan.similarity:
        say("no embeddings extra: role tasks are judged by keywords and length only")
    result = run_suite(plan, progress=say)
    if args.compare:
        result = conclude(result.evidence, previous=load(args.compare).evidence)
    save(result, args.out / "evidence.json")
    show(result)
    files = write_report(result, args.out)
    say(f"report {files.markdown}, chart {files.chart}, figures {files.figures}")
    return 0


def show(result: SuiteResult) -> None:
    """Every figure of the run, one line a row."""
    ev = result.evidence
    st = ev.stamp
    say(f"{st.cpu}: {st.physical_cores} cores / {st.logical_cpus} CPUs, preset {st.preset}, "
        f"llama.cpp {st.llama_cpp_commit}, {st.threads} threads")
    for row in ev.speed:
        say(f"speed {row.model:28} {row.threads}t: prompt {row.prompt_tps:8.1f} t/s, decode "
            f"{row.decode_tps:7.1f} t/s, TTFT {row.ttft_ms:6.1f} ms, p50/p90/p99 "
            f"{row.latency_p50_ms:.0f}/{row.latency_p90_ms:.0f}/{row.latency_p99_ms:.0f} ms, "
            f"load {row.load_ms:.0f} ms, RSS {row.peak_rss_mib:.0f} MiB, "
            f"CPU {100 * row.cpu_utilisation:.0f}%")
    if ev.roofline:
        say(f"memory read bandwidth {ev.roofline[0].bandwidth_gb_per_s:.1f} GB/s")
    for roof in ev.roofline:
        say(f"roofline {roof.model:28} {roof.bytes_per_token / 2**20:8.2f} MiB/token -> bound "
            f"{roof.decode_bound_tps:9.1f} t/s" + (f", measured {roof.percent_of_bound:.0f}%"
                                                   if roof.percent_of_bound else ""))
    for pt in ev.thread_sweep:
        say(f"sweep {pt.label:24} decode {pt.decode_tps:7.1f} t/s (x{pt.decode_ratio:.3f}), "
            f"prompt {pt.prompt_tps:8.1f} t/s (x{pt.prompt_ratio:.3f})")
    for pt in ev.presets:
        say(f"preset {pt.preset:8} pp {pt.pp_tps:8.1f} t/s (x{pt.pp_ratio:.3f}), tg "
            f"{pt.tg_tps:7.1f} t/s (x{pt.tg_ratio:.3f})")
    for q in ev.quality:
        say(f"quality {q.model:28} vs {q.reference}: KLD mean {q.kld_mean:.6f} p99 "
            f"{q.kld_p99:.6f}, top-1 {100 * q.top1_agreement:.2f}%, PPL {q.ppl:.3f}")
    for check in ev.crosscheck:
        say(f"cross-check {check.pair}: ours {check.ours_kld_mean:.6f} vs llama-perplexity "
            f"{check.llama_kld_mean:.6f} (tolerance {check.tolerance:.6f}) top-1 "
            f"{100 * check.ours_top1:.2f}% vs {100 * check.llama_top1:.2f}% -> "
            f"{'OK' if check.within else 'MISMATCH'}")
    for t in ev.tasks:
        say(f"task {t.model:28} {t.role:11} {t.task:18} success {100 * t.success_rate:3.0f}% "
            f"keywords {100 * t.keyword_coverage:3.0f}%")
    for r in result.decision:
        say(f"recommend {r.role:11} {r.model} ({r.file_type}): " + "; ".join(r.reasons))
    for g in result.regressions or ():
        say(f"REGRESSION {g.section} {g.key} {g.metric}: {g.old:.4g} -> {g.new:.4g} "
            f"({100 * g.change:+.1f}%)")


if __name__ == "__main__":
    sys.exit(main())
