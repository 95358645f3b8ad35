"""Batching speed: aggregate decode tokens/s at 1, 2, 4, 8 concurrent requests, tongyi_local
against llama-batched-bench built from the same llama.cpp source, same model, threads, prompt and
generation lengths, in one run, interleaved rounds, medians.

    .venv/bin/python benchmarks/batching.py                 # starter model, 5 rounds
    .venv/bin/python benchmarks/batching.py --rounds 9 --json batching.json

Reference: llama-batched-bench -npp PP -ntg TG -npl 1,2,4,8 (distinct random prompts, all
sequences decoding in lockstep); S_TG = B*TG / time of the TG phase. It runs twice per round:
with a unified KV cache (-kvu, the layout the library uses) and with its default split cache.
Library: B threads each run ``complete`` with a distinct PP-token prompt, greedy sampling in the
loop, ``max_tokens = TG + 1`` (TG decode steps). The prompts are evaluated once beforehand
(max_tokens=1) so that every request's prompt is cached and the B requests start decoding within
a step of each other; aggregate = sum of decode tokens / (last token - first token, over all B),
which counts any start-up stagger against the library. The library never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

import tongyi_local
from tongyi_local import build, hardware
from tongyi_local.backends.llama import LlamaGenerator

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]


def batched_bench(binary: Path, model: Path, threads: int, ctx: int, pp: int, tg: int,
                  batches: list[int], unified: bool) -> dict[int, float]:
    """One llama-batched-bench run; S_TG (aggregate decode t/s) per batch size."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
           "-npp", str(pp), "-ntg", str(tg), "-npl", ",".join(map(str, batches)),
           "--output-format", "jsonl", "-kvu" if unified else "-no-kvu"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {row["pl"]: row["speed_tg"] for row in rows}


def prompt_of(gen: LlamaGenerator, n_tokens: int, index: int) -> str:
    """A text of exactly ``n_tokens`` tokens (with BOS) whose first word differs per index."""
    words = WORDS[index % len(WORDS):] + WORDS[:index % len(WORDS)]
    text, i = f"{index}", 0
    while len(gen.tokenize(text)) < n_tokens:
        text += " " + words[i % len(words)]
        i += 1
    while len(gen.tokenize(text)) > n_tokens:
        text = text[:-1]
    if len(gen.tokenize(text)) != n_tokens:
        raise SystemExit(f"could not build a prompt of exactly {n_tokens} tokens")
    return text


def together(fn, args_list):
    results: list = [None] * len(args_list)
    gate = threading.Barrier(len(args_list))

    def work(i, args):
        gate.wait()
        results[i] = (time.perf_counter(), fn(*args))

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def library_round(gen: LlamaGenerator, prompts: list[str], tg: int) -> float:
    """Aggregate decode t/s of len(prompts) concurrent greedy requests."""
    gen.clear_cache()
    together(lambda p: gen.complete(p, max_tokens=1, temperature=0), [(p,) for p in prompts])
    runs = together(lambda p: gen.complete(p, max_tokens=tg + 1, temperature=0, ignore_eos=True),
                    [(p,) for p in prompts])
    first = min(t0 + c.timings.ttft_ms / 1e3 for t0, c in runs)
    last = max(t0 + (c.timings.ttft_ms + c.timings.decode_ms) / 1e3 for t0, c in runs)
    tokens = sum(c.timings.decode_tokens for _, c in runs)
    assert all(c.timings.decode_tokens == tg for _, c in runs)
    return tokens / (last - first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: the starter model)")
    parser.add_argument("--threads", type=int, help="threads (default: the thread plan's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    model = args.model or tongyi_local.starter_model_path()
    record = build.installed_build()
    if not record:
        raise SystemExit("llama-cpp-python was not built by tongyi_local; run ./bootstrap.sh first")
    preset = build.select_preset(record["preset"])
    bench_bin = build.build_tools(preset)["llama-batched-bench"]
    threads = hardware.this_machine_plan(threads=args.threads).threads
    print(f"model {model.name} | preset {preset.name} | threads {threads} | pp {args.pp} "
          f"tg {args.tg} | ctx {args.ctx} | rounds {args.rounds}\n")

    gen = LlamaGenerator(model, n_ctx=args.ctx, n_batch=2048, n_ubatch=512, slots=max(batches),
                         threads=threads)
    prompts = [prompt_of(gen, args.pp, i) for i in range(max(batches))]
    library_round(gen, prompts[:2], 16)  # warm-up, as llama-batched-bench does

    sides = ("unified", "split", "lib")
    figures: dict[str, dict[int, list[float]]] = {s: {b: [] for b in batches} for s in sides}
    for r in range(args.rounds):
        order = sides[r % 3:] + sides[:r % 3]
        for side in order:
            if side == "lib":
                for b in batches:
                    figures["lib"][b].append(library_round(gen, prompts[:b], args.tg))
            else:
                got = batched_bench(bench_bin, model, threads, args.ctx, args.pp, args.tg,
                                    batches, side == "unified")
                for b in batches:
                    figures[side][b].append(got[b])
        print(f"round {r + 1}/{args.rounds}: " + " | ".join(
            f"B={b} bench-kvu {figures['unified'][b][-1]:.1f} bench {figures['split'][b][-1]:.1f}"
            f" lib {figures['lib'][b][-1]:.1f}" for b in batches), flush=True)
    gen.close()

    med = {s: {b: statistics.median(v) for b, v in figures[s].items()} for s in sides}
    print(f"\naggregate decode t/s (medians of {args.rounds} interleaved rounds)")
    print(f"{'B':>3} {'batched-bench -kvu':>19} {'batched-bench':>14} {'tongyi_local':>13} "
          f"{'vs -kvu':>8} {'vs split':>9} {'vs B=1':>7}")
    for b in batches:
        lib = med["lib"][b]
        print(f"{b:>3} {med['unified'][b]:>19.1f} {med['split'][b]:>14.1f} {lib:>13.1f} "
              f"{lib / med['unified'][b]:>8.3f} {lib / med['split'][b]:>9.3f} "
              f"{lib / med['lib'][batches[0]]:>7.2f}")
    print("targets: >= 0.95x llama-batched-bench at every B; at B=4 >= 1.5x the B=1 rate")
    if args.json:
        args.json.write_text(json.dumps({"model": model.name, "threads": threads, "pp": args.pp,
                                         "tg": args.tg, "ctx": args.ctx, "rounds": figures,
                                         "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
