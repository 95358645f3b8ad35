"""Prompt-lookup speculative decoding: decode tokens/s with and without drafts, side by side in one
run (interleaved rounds, medians), on a code-editing set and a fresh-writing set, greedy, at 1 and
4 concurrent requests, on the packaged models.

    .venv/bin/python benchmarks/speculative.py                      # both packaged models, 3 rounds
    .venv/bin/python benchmarks/speculative.py --models chat --rounds 5 --json spec.json

Code editing: a generated ~300-line Python module in the prompt and an instruction (rename a
variable, add type hints, apply a described change); the prompt ends by opening the answer's code
block ("```python"), so the small packaged models re-emit the file (the "copied" column: the share
of the answer's lines that are lines of the input file). Fresh writing: short essays and stories
with nothing to copy. One generator per model; ``gen.speculative`` switches drafts on and off
between requests on the same context. Prompts are evaluated once beforehand so decode alone is
timed. Per request: decode t/s = decode_tokens / decode_ms; at B=4 the aggregate is the sum of
decode tokens over the span from the first request's first token to the last one's last token.
"Identical" compares each request's greedy text with drafts to the text without; "repeated", its
text with drafts in later rounds to the first round's (draft lengths depend on the tokens alone;
at B=4 the batch's make-up still depends on timing). Targets: code editing >= 2.0x (>= 1.5x at
B=4), fresh writing >= 0.97x, identical 100 %.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import tongyi_local
from tongyi_local import Message
from tongyi_local.backends._lookup import DRAFT_COST
from tongyi_local.backends.llama import LlamaGenerator


N_FUNCTIONS = 30  # --functions: 30 gives a ~275-line module


def module_source(n_functions: int | None = None) -> str:
    """A ~300-line module of small, distinct functions that share a variable name (``total``)."""
    ops = ["+", "-", "*", "//", "%"]
    parts = ['"""Inventory arithmetic helpers."""', "", "import math", ""]
    for i in range(n_functions or N_FUNCTIONS):
        op = ops[i % len(ops)]
        parts += [
            "",
            f"def compute_{i}(items, factor):",
            f'    """Combine the items of batch {i} with the factor."""',
            "    total = 0",
            "    for item in items:",
            f"        total = total {op} (item * factor + {i})",
            f"    if total > {100 + i * 7}:",
            f"        total = math.floor(total / {i + 2})",
            "    return total",
        ]
    return "\n".join(parts) + "\n"


EDITS = [
    "Rename the variable `total` to `running_sum` everywhere. Output the whole file.",
    "Add type hints to every function (items: list[int], factor: int, returns int). "
    "Output the whole file.",
    "Change every function so that it returns `total + 1` instead of `total`. "
    "Output the whole file.",
    "Rename the parameter `factor` to `scale` everywhere. Output the whole file.",
]
FRESH = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in a few paragraphs why the sky is blue.",
    "Write a letter to a friend describing a trip to the mountains.",
    "Describe the history of the bicycle in a short essay.",
]


def prompts(gen: LlamaGenerator, kind: str, functions: int | None = None) -> list[str]:
    source = module_source(functions)
    if kind == "edit":
        asks = [f"{task}\n\n```python\n{source}```" for task in EDITS]
        return [gen.render_chat((Message("user", a),)) + "```python\n" for a in asks]
    return [gen.render_chat((Message("user", a),)) for a in FRESH]


def copied(text: str) -> float:
    lines = {ln.strip() for ln in module_source().splitlines() if ln.strip()}
    out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return sum(ln in lines for ln in out) / len(out) if out else 0.0


def run_batch(gen: LlamaGenerator, batch: list[str], max_tokens: int) -> tuple[float, list]:
    """Run the prompts together; (aggregate decode t/s, completions)."""
    results: list = [None] * len(batch)
    gate = threading.Barrier(len(batch))

    def work(i: int) -> None:
        gate.wait()
        try:
            results[i] = gen.complete(batch[i], temperature=0, max_tokens=max_tokens)
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    if len(batch) == 1:
        return results[0].timings.decode_tokens_per_s, results
    spans = [(c.timings.ttft_ms, c.timings.ttft_ms + c.timings.decode_ms) for c in results]
    # ttft is measured from each request's own start; the barrier starts them within a step
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    tokens = sum(c.timings.decode_tokens for c in results)
    return (tokens / span * 1e3 if span > 0 else 0.0), results


def fit_module(gen: LlamaGenerator, width: int, max_tokens: int) -> int:
    """Functions in the edited module such that ``width`` edit requests and their answers fit in
    the context together (the configured size when they do)."""
    n = N_FUNCTIONS
    while n > 4 and width * (len(gen.tokenize(prompts(gen, "edit", n)[0])) + max_tokens + 64) \
            > gen.info.n_ctx:
        n -= 2
    return n


def bench(gen: LlamaGenerator, kind: str, width: int, rounds: int, max_tokens: int) -> dict:
    functions = fit_module(gen, width, max_tokens)
    all_prompts = prompts(gen, kind, functions)
    for p in all_prompts:  # cache every prompt so that decode alone is timed
        gen.complete(p, temperature=0, max_tokens=1)
    batches = [[p] for p in all_prompts] if width == 1 else [all_prompts[:width]]
    speeds: dict[str, list[float]] = {"off": [], "on": []}
    same, total, drafted, accepted, copy = 0, 0, 0, 0, []
    first_on: dict[int, list[str]] = {}  # per batch, the first round's texts with drafts
    repeated, repeats = 0, 0
    for r in range(rounds):
        for b_index, batch in enumerate(batches):
            texts = {}
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                gen.speculative = "ngram" if mode == "on" else None
                speed, done = run_batch(gen, batch, max_tokens)
                speeds[mode].append(speed)
                texts[mode] = [c.text for c in done]
                if mode == "on":
                    drafted += sum(c.timings.draft_tokens for c in done)
                    accepted += sum(c.timings.accepted_tokens for c in done)
                    copy += [copied(c.text) for c in done]
            same += sum(a == b for a, b in zip(texts["on"], texts["off"]))
            total += len(batch)
            if b_index in first_on:
                repeated += sum(a == b for a, b in zip(texts["on"], first_on[b_index]))
                repeats += len(batch)
            else:
                first_on[b_index] = texts["on"]
    gen.speculative = "ngram"
    off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
    return {"kind": kind, "B": width, "off_tps": off, "on_tps": on,
            "module_lines": len(module_source(functions).splitlines()) if kind == "edit" else None,
            "ratio": on / off if off else 0.0, "acceptance": accepted / drafted if drafted else 0.0,
            "drafted": drafted, "identical": f"{same}/{total}",
            "repeated": f"{repeated}/{repeats}",
            "copied": statistics.mean(copy) if kind == "edit" else None}


LOOKUP_SPEED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
LOOKUP_COUNT = re.compile(r"\b(n_drafted|n_accept)\s*=\s*(\d+)")


def llama_lookup(binary: Path, model: Path, prompt: str, *, draft: int, max_tokens: int,
                 n_ctx: int, threads: int) -> tuple[float, str, int, int]:
    """llama.cpp's own prompt-lookup program (examples/lookup) on one prompt, greedy:
    (decode t/s, generated text, drafted, accepted). ``draft=0`` is its plain decoding."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as fh:
        fh.write(prompt)
        fh.flush()
        # -b n_ctx: llama-lookup evaluates the whole prompt as one batch
        done = subprocess.run([str(binary), "-m", str(model), "-f", fh.name, "-n", str(max_tokens),
                               "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads),
                               "-tb", str(threads), "--temp", "0", "--spec-draft-n-max", str(draft)],
                              capture_output=True, text=True, timeout=1800, check=True)
    tokens, seconds = LOOKUP_SPEED.search(done.stderr).groups()
    counts = dict(LOOKUP_COUNT.findall(done.stderr))
    return (int(tokens) / float(seconds), done.stdout,
            int(counts.get("n_drafted", 0)), int(counts.get("n_accept", 0)))


def bench_llama_lookup(gen: LlamaGenerator, kind: str, rounds: int, max_tokens: int,
                       threads: int, draft: int) -> dict:
    """The same prompts through llama-lookup with drafts of up to ``draft`` tokens and without
    (interleaved rounds, medians): what llama.cpp's own tool reaches on this machine."""
    from tongyi_local import build

    binary = build.build_tools(build.select_preset(None), tools=("llama-lookup",))["llama-lookup"]
    speeds: dict[str, list[float]] = {"off": [], "on": []}
    same, total, drafted, accepted = 0, 0, 0, 0
    for r in range(rounds):
        for prompt in prompts(gen, kind):
            texts = {}
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                tps, text, d, a = llama_lookup(binary, gen.path, prompt,
                                               draft=draft if mode == "on" else 0,
                                               max_tokens=max_tokens, n_ctx=gen.info.n_ctx,
                                               threads=threads)
                speeds[mode].append(tps)
                texts[mode] = text
                if mode == "on":
                    drafted, accepted = drafted + d, accepted + a
            same += texts["on"] == texts["off"]
            total += 1
    off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
    return {"kind": kind, "B": 1, "off_tps": off, "on_tps": on, "ratio": on / off if off else 0.0,
            "acceptance": accepted / drafted if drafted else 0.0, "drafted": drafted,
            "identical": f"{same}/{total}", "repeated": "-", "copied": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="chat,starter", help="chat, starter or a GGUF path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--widths", default="1,4", help='"" runs only llama-lookup')
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-draft", type=int, default=8, help="draft tokens per step at most")
    parser.add_argument("--ngram-size", type=int, default=3)
    parser.add_argument("--draft-cost", type=float, default=DRAFT_COST,
                        help="share of a one-request step one draft token is charged")
    parser.add_argument("--kv-cache-type", default="f16")
    parser.add_argument("--functions", type=int, default=30,
                        help="functions in the edited module (9 lines each)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--no-llama-lookup", action="store_true",
                        help="skip llama.cpp's own llama-lookup on the same prompts (B=1)")
    args = parser.parse_args()
    globals()["N_FUNCTIONS"] = args.functions
    paths = {"chat": tongyi_local.starter_chat_model_path,
             "starter": tongyi_local.starter_model_path}
    rows = []
    print(f"{'model':<28} {'set':<5} {'B':>2} {'off t/s':>8} {'on t/s':>8} {'ratio':>6} "
          f"{'accept':>7} {'identical':>9} {'repeated':>8} {'copied':>7} {'lines':>5}")
    for name in args.models.split(","):
        path = paths[name]() if name in paths else name
        with LlamaGenerator(path, n_ctx=16384, slots=4, threads=args.threads,
                            speculative="ngram", max_draft=args.max_draft,
                            ngram_size=args.ngram_size, draft_cost=args.draft_cost,
                            kv_cache_type=args.kv_cache_type) as gen:
            for width in map(int, filter(None, args.widths.split(","))):
                for kind in ("edit", "fresh"):
                    row = bench(gen, kind, width, args.rounds, args.max_tokens)
                    row["model"] = gen.name
                    rows.append(row)
                    cp = f"{row['copied']:.0%}" if row["copied"] is not None else "-"
                    print(f"{gen.name:<28} {kind:<5} {width:>2} {row['off_tps']:>8.1f} "
                          f"{row['on_tps']:>8.1f} {row['ratio']:>5.2f}x {row['acceptance']:>6.0%} "
                          f"{row['identical']:>9} {row['repeated']:>8} {cp:>7} "
                          f"{row['module_lines'] or '-':>5}",
                          flush=True)
            if args.no_llama_lookup:
                continue
            for kind in ("edit", "fresh"):
                row = bench_llama_lookup(gen, kind, args.rounds, args.max_tokens,
                                         gen.thread_plan.threads, args.max_draft)
                row["model"] = f"llama-lookup {gen.name}"
                rows.append(row)
                print(f"{row['model']:<28} {kind:<5} {1:>2} {row['off_tps']:>8.1f} "
                      f"{row['on_tps']:>8.1f} {row['ratio']:>5.2f}x {row['acceptance']:>6.0%} "
                      f"{row['identical']:>9} {'-':>8} {'-':>7} "
                      f"{len(module_source().splitlines()) if kind == 'edit' else '-':>5}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
