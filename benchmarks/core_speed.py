"""Core speed: tongyi_local against llama-bench on the same model, threads and build.

Prints pp512 and tg128 tokens/s for llama.cpp's own llama-bench (built from the llama.cpp that the
installed llama-cpp-python vendors, with the same CMake preset) and for the library, as medians of
interleaved rounds, and their ratios; plus TTFT, load time and peak RSS; plus the AVX-512 (zen4)
vs AVX2 preset ratio measured with llama-bench builds of both presets.

    ./bootstrap.sh bench                      # or: .venv/bin/python benchmarks/core_speed.py
    .venv/bin/python benchmarks/core_speed.py --rounds 9 --json results.json

The library side uses only the public API: tg runs with real greedy sampling in the loop
(llama-bench samples nothing), pp is the prompt evaluation time of a 512-token prompt.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import tongyi_local
from tongyi_local import build, hardware
from tongyi_local.backends.llama import LlamaGenerator


def llama_bench(binary: Path, model: Path, threads: int, pp: int, tg: int) -> dict[str, float]:
    """One llama-bench invocation (it warms up, then runs each test twice); t/s per test."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", str(pp), "-n", str(tg),
           "-r", "2", "-o", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(run.stdout)
    result = {}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        result[key] = row["avg_ts"]
    result["commit"] = rows[0].get("build_commit", "?")
    return result


def prompt_of(gen: LlamaGenerator, n_tokens: int) -> str:
    """A text that tokenizes (with BOS) to exactly ``n_tokens`` tokens."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    text, i = "", 0
    while len(gen.tokenize(text)) < n_tokens:
        text += (" " if text else "") + words[i % len(words)]
        i += 1
    if len(gen.tokenize(text)) != n_tokens:
        raise SystemExit(f"could not build a prompt of exactly {n_tokens} tokens")
    return text


def library_round(gen: LlamaGenerator, pp_text: str, tg: int) -> dict[str, float]:
    pp = gen.complete(pp_text, max_tokens=1, temperature=0)
    tgc = gen.complete("The", max_tokens=tg + 1, temperature=0, ignore_eos=True)
    assert tgc.timings.decode_tokens == tg
    return {"pp": pp.timings.prompt_tokens_per_s, "tg": tgc.timings.decode_tokens_per_s}


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: the starter model)")
    parser.add_argument("--threads", type=int, help="threads (default: the thread plan's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--no-presets", action="store_true",
                        help="skip the zen4 vs avx2 comparison (it builds the avx2 tools once)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()

    model = args.model or tongyi_local.starter_model_path()
    record = build.installed_build()
    if not record:
        raise SystemExit("llama-cpp-python was not built by tongyi_local; run ./bootstrap.sh first")
    preset = build.select_preset(record["preset"])
    bench_bin = build.build_tools(preset)["llama-bench"]
    plan = hardware.this_machine_plan(threads=args.threads)
    threads = plan.threads
    topo = hardware.read_topology()
    print(f"model   {model.name}\ncpu     {topo.model_name} ({topo.physical_cores} cores / "
          f"{topo.logical_cpus} threads)\npreset  {preset.name} (key {preset.key})\n"
          f"threads {threads}  pinned {list(plan.pin_cpus) if plan.pin_cpus else 'no'}\n")

    load_ms = []
    for _ in range(3):
        started = time.perf_counter()
        LlamaGenerator(model, n_ctx=2048, threads=threads).close()
        load_ms.append((time.perf_counter() - started) * 1e3)
    gen = LlamaGenerator(model, n_ctx=2048, threads=threads, reuse_prompt_prefix=False)
    pp_text = prompt_of(gen, args.pp)
    library_round(gen, pp_text, 16)  # warm-up, as llama-bench does

    ref: dict[str, list[float]] = {"pp": [], "tg": []}
    lib: dict[str, list[float]] = {"pp": [], "tg": []}
    commit = "?"
    for i in range(args.rounds):
        order = ("ref", "lib") if i % 2 == 0 else ("lib", "ref")
        for side in order:
            if side == "ref":
                r = llama_bench(bench_bin, model, threads, args.pp, args.tg)
                ref["pp"].append(r[f"pp{args.pp}"])
                ref["tg"].append(r[f"tg{args.tg}"])
                commit = r["commit"]
            else:
                r = library_round(gen, pp_text, args.tg)
                lib["pp"].append(r["pp"])
                lib["tg"].append(r["tg"])
        print(f"round {i + 1}/{args.rounds}: llama-bench pp {ref['pp'][-1]:.1f} tg "
              f"{ref['tg'][-1]:.1f} | tongyi_local pp {lib['pp'][-1]:.1f} tg {lib['tg'][-1]:.1f}",
              flush=True)

    ttft = [gen.chat([{"role": "user", "content": "Name three colours."}], max_tokens=1,
                     temperature=0).timings.ttft_ms for _ in range(5)]
    gen.close()
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_bench = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    figures = {
        "model": model.name, "preset": preset.name, "threads": threads, "llama_cpp_commit": commit,
        "rounds": args.rounds,
        f"llama_bench_pp{args.pp}": median(ref["pp"]), f"llama_bench_tg{args.tg}": median(ref["tg"]),
        f"library_pp{args.pp}": median(lib["pp"]), f"library_tg{args.tg}": median(lib["tg"]),
        "ratio_pp": median(lib["pp"]) / median(ref["pp"]),
        "ratio_tg": median(lib["tg"]) / median(ref["tg"]),
        "ratio_pp_paired": median([a / b for a, b in zip(lib["pp"], ref["pp"])]),
        "ratio_tg_paired": median([a / b for a, b in zip(lib["tg"], ref["tg"])]),
        "ttft_ms_median": median(ttft), "load_ms_median": median(load_ms),
        "peak_rss_mib_library_process": rss_self, "peak_rss_mib_llama_bench": rss_bench,
    }
    print(f"\n{'':24}{'llama-bench':>14}{'tongyi_local':>14}{'ratio':>8}  (target)")
    print(f"{f'pp{args.pp} t/s':24}{figures[f'llama_bench_pp{args.pp}']:>14.1f}"
          f"{figures[f'library_pp{args.pp}']:>14.1f}{figures['ratio_pp']:>8.3f}  (>= 0.98)")
    print(f"{f'tg{args.tg} t/s (greedy)':24}{figures[f'llama_bench_tg{args.tg}']:>14.1f}"
          f"{figures[f'library_tg{args.tg}']:>14.1f}{figures['ratio_tg']:>8.3f}  (>= 0.96)")
    print(f"paired per-round ratio medians: pp {figures['ratio_pp_paired']:.3f}, "
          f"tg {figures['ratio_tg_paired']:.3f}")
    print(f"TTFT (short chat prompt) {median(ttft):.1f} ms | load {median(load_ms):.0f} ms | "
          f"peak RSS {rss_self:.0f} MiB (library process), {rss_bench:.0f} MiB (llama-bench)")

    if not args.no_presets:
        figures.update(preset_comparison(model, threads, args))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def preset_comparison(model: Path, threads: int, args: argparse.Namespace) -> dict[str, float]:
    """zen4 (AVX-512) vs avx2 llama-bench builds of the same source, interleaved."""
    presets = build.load_presets()
    bins = {name: build.build_tools(presets[name])["llama-bench"] for name in ("zen4", "avx2")}
    runs: dict[str, dict[str, list[float]]] = {n: {"pp": [], "tg": []} for n in bins}
    rounds = max(3, args.rounds // 2)
    for i in range(rounds):
        for name in (("zen4", "avx2") if i % 2 == 0 else ("avx2", "zen4")):
            r = llama_bench(bins[name], model, threads, args.pp, args.tg)
            runs[name]["pp"].append(r[f"pp{args.pp}"])
            runs[name]["tg"].append(r[f"tg{args.tg}"])
    out = {}
    print(f"\n{'preset (llama-bench)':24}{'zen4':>14}{'avx2':>14}{'zen4/avx2':>11}")
    for test, label in (("pp", f"pp{args.pp}"), ("tg", f"tg{args.tg}")):
        z, a = median(runs["zen4"][test]), median(runs["avx2"][test])
        out[f"zen4_{label}"], out[f"avx2_{label}"], out[f"zen4_over_avx2_{label}"] = z, a, z / a
        print(f"{label + ' t/s':24}{z:>14.1f}{a:>14.1f}{z / a:>11.3f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
