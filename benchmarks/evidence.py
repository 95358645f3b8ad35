"""The full evidence suite: speed, sweeps, presets, roofline, quality ladders, cross-check, role
tasks, cost -> report.md + pareto.png + figures.json.

    .venv/bin/python benchmarks/evidence.py                       # starter + tiny F16 ladder
    .venv/bin/python benchmarks/evidence.py --ladder Q8.gguf Q6_K.gguf Q4_K_M.gguf --no-builtin
    .venv/bin/python benchmarks/evidence.py --compare old/figures.json --out new/

Here it runs on the starter model (reference: its own Q4_K_M, against lower quantizations made
from it) and on a tiny random-weight model written at F16 (the ladder F16 -> Q8_0 -> Q6_K ->
Q5_K_M -> Q4_K_M). On a server, pass each real model's files as one --ladder: the reference is
the highest-precision file of each ladder. It prints figures and ratios; it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tongyi_local
from tongyi_local.backends import embeddings
from tongyi_local.backends.quantize import quantize
from tongyi_local.evidence import results, roofline as rl, speed, sweep
from tongyi_local.evidence.quality import crosscheck, pick_reference, quality_ladder
from tongyi_local.evidence.report import write_report
from tongyi_local.evidence.tasks import run_tasks
from tongyi_local.evidence.tools import tool_paths
from tongyi_local.testing import write_tiny_model

CORPUS = Path(__file__).resolve().parent / "corpus" / "corpus.txt"


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
    p.add_argument("--presets", nargs="*", default=["zen4", "avx2", "native"],
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
    corpus = CORPUS.read_text()
    ev = results.new_evidence(stamp=speed.stamp())
    st = ev["stamp"]
    say(f"{st['cpu']}: {st['physical_cores']} cores / {st['logical_cpus']} CPUs, preset "
        f"{st['preset']}, llama.cpp {st['llama_cpp_commit']}, {st['threads']} threads")

    models = [m for ladder in ladders for m in ladder]
    for model in models:
        for threads in [None, *args.threads]:
            row = speed.run_isolated(model, threads=threads, rounds=args.rounds, n_ctx=4096)
            results.add(ev, "speed", [row])
            say(f"speed {row.model:28} {row.threads}t: prompt {row.prompt_tps:8.1f} t/s, decode "
                f"{row.decode_tps:7.1f} t/s, TTFT {row.ttft_ms:6.1f} ms, p50/p90/p99 "
                f"{row.latency_p50_ms:.0f}/{row.latency_p90_ms:.0f}/{row.latency_p99_ms:.0f} ms, "
                f"load {row.load_ms:.0f} ms, RSS {row.peak_rss_mib:.0f} MiB, "
                f"CPU {100 * row.cpu_utilisation:.0f}%")

    bw = rl.measure_bandwidth()
    say(f"memory read bandwidth {bw.gb_per_s:.1f} GB/s ({bw.threads} threads)")
    best = {}
    for r in ev["speed"]:
        best[r["path"]] = max(best.get(r["path"], 0.0), r["decode_tps"])
    moe = write_tiny_model(work / "tiny-qwen3moe.gguf", "qwen3moe", dtype="f16")
    for path, tps in [*best.items(), (str(moe), None)]:
        roof = rl.roofline(path, bw, tps)
        results.add(ev, "roofline", [roof])
        say(f"roofline {roof.model:28} {roof.bytes_per_token / 2**20:8.2f} MiB/token -> bound "
            f"{roof.decode_bound_tps:9.1f} t/s" + (f", measured {roof.percent_of_bound:.0f}%"
                                                   if roof.percent_of_bound else ""))

    if not args.no_sweep:
        points = sweep.thread_sweep(ladders[0][0], rounds=1, n_ctx=4096)
        results.add(ev, "thread_sweep", points)
        for pt in points:
            say(f"sweep {pt.label:24} decode {pt.decode_tps:7.1f} t/s (x{pt.decode_ratio:.3f}), "
                f"prompt {pt.prompt_tps:8.1f} t/s (x{pt.prompt_ratio:.3f})")
    if args.presets:
        points = sweep.preset_comparison(ladders[0][0], presets=tuple(args.presets))
        results.add(ev, "presets", points)
        for pt in points:
            say(f"preset {pt.preset:8} pp {pt.pp_tps:8.1f} t/s (x{pt.pp_ratio:.3f}), tg "
                f"{pt.tg_tps:7.1f} t/s (x{pt.tg_ratio:.3f})")

    for ladder in ladders:
        ref = pick_reference(ladder)
        rows = quality_ladder(ref, [m for m in ladder if m != ref], corpus,
                              n_ctx=args.quality_ctx, max_chunks=args.quality_chunks)
        results.add(ev, "quality", rows)
        for q in rows:
            say(f"quality {q.model:28} vs {q.reference}: KLD mean {q.kld_mean:.6f} p99 "
                f"{q.kld_p99:.6f}, top-1 {100 * q.top1_agreement:.2f}%, PPL {q.ppl:.3f}")
    binary = tool_paths(tools=("llama-perplexity",))["llama-perplexity"]
    for ladder in ladders:
        ref = pick_reference(ladder)
        others = [m for m in ladder if m != ref]
        if not others:
            continue
        lowest = min(others, key=lambda m: m.stat().st_size)
        check = crosscheck(ref, lowest, CORPUS, binary=binary, n_ctx=min(args.quality_ctx, 256),
                           chunks=4)
        results.add(ev, "crosscheck", [check])
        say(f"cross-check {check['pair']}: ours {check['ours_kld_mean']:.6f} vs llama-perplexity "
            f"{check['llama_kld_mean']:.6f} (tolerance {check['tolerance']:.6f}) top-1 "
            f"{100 * check['ours_top1']:.2f}% vs {100 * check['llama_top1']:.2f}% -> "
            f"{'OK' if check['within'] else 'MISMATCH'}")

    sim = embeddings.similarity if embeddings.available() else None
    say("role tasks" + ("" if sim else " (no embeddings extra: keywords and length only)"))
    for model in ladders[0]:
        with tongyi_local.load(model, n_ctx=2048) as gen:
            rows = run_tasks(gen, iterations=args.iterations, similarity=sim, model=model.stem)
        results.add(ev, "tasks", rows)
        for t in rows:
            say(f"task {t.model:28} {t.role:11} {t.task:18} success {100 * t.success_rate:3.0f}% "
                f"keywords {100 * t.keyword_coverage:3.0f}%")

    first = {str(m) for m in ladders[0]}
    top = max((r for r in ev["speed"] if r["path"] in first), key=lambda r: r["decode_tps"])
    ev["cost"] = {"inputs": {"tokens_per_s": top["decode_tps"],
                             "api_usd_per_1k_tokens": args.api_usd_per_1k},
                  "model": top["model"]}
    results.save_evidence(ev, args.out / "evidence.json")
    previous = results.load_evidence(args.compare) if args.compare else None
    files = write_report(ev, args.out, previous=previous)
    say(f"report {files.markdown}, chart {files.chart}, figures {files.figures}")
    for g in files.regressions:
        say(f"REGRESSION {g.section} {g.key} {g.metric}: {g.old:.4g} -> {g.new:.4g} "
            f"({100 * g.change:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
