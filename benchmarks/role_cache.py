"""Per-role prompt cache: TTFT of a role's second request after another role used the same model,
and of a fresh process's first request once an earlier process saved the role prefix on disk.

Two roles share one model (the starter model by default), each with a ~1,000-token system prompt.
In one process: role A asks (cold), role B asks (its own system prompt), role A asks again: A's
second request must not re-evaluate A's system prompt. Across processes: a process runs role A's
first request with the disk cache empty (it saves the prefix), then a fresh process runs role A's
first request and restores the prefix from disk. Targets: both ratios <= 0.1. Medians over
rounds, each round on freshly loaded models; the disk cache lives in a temp directory.

    .venv/bin/python benchmarks/role_cache.py [--rounds 5] [--system-tokens 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tongyi_local
from tongyi_local.config import load_config
from tongyi_local.registry import Registry

FILLER = ("You review pull requests for a payments service. Check error handling, input "
          "validation, logging hygiene, SQL parameterisation and concurrency. ")


def system_prompt(label: str, words: int) -> str:
    text = f"Role {label}. "
    while len(text.split()) < words:
        text += FILLER
    return text


def child(config_file: Path, words: int) -> int:
    """One fresh process: role A's first request; prints its TTFT and cached tokens as JSON."""
    registry = Registry(load_config(config_file))
    coder = registry.for_role("coder")
    coder.complete("Hello", temperature=0, max_tokens=1)  # load the model outside the timing
    answer = coder.chat([{"role": "system", "content": system_prompt("A", words)},
                         {"role": "user", "content": "Review: x = eval(input())"}],
                        temperature=0, max_tokens=1)
    registry.close()  # waits for the prefix's state file
    print(json.dumps({"ttft_ms": answer.timings.ttft_ms, "prompt": answer.usage.prompt_tokens,
                      "cached": answer.usage.cached_prompt_tokens}))
    return 0


def config_for(model: Path, directory: str) -> Path:
    """A models.toml with two roles (coder, reviewer) sharing ``model``."""
    config_file = Path(directory) / "models.toml"
    config_file.write_text(f'[models.shared]\nsource = "path"\npath = "{model}"\n'
                           'context_length = 4096\n[roles.coder]\nmodel = "shared"\n'
                           '[roles.reviewer]\nmodel = "shared"\n')
    return config_file


def fresh_processes(model: Path, words: int, rounds: int) -> None:
    """Role A's first request in a process with the disk cache empty, then in a fresh one."""
    from tongyi_local.backends import prefix_store

    uncached, cached, seen = [], [], []
    with tempfile.TemporaryDirectory() as kv:
        config_file = config_for(model, kv)
        env = {**os.environ, prefix_store.DIR_ENV: kv}
        env.pop(prefix_store.BYTES_ENV, None)
        for _ in range(rounds):
            prefix_store.clear(Path(kv))
            runs = []
            for _ in range(2):
                done = subprocess.run([sys.executable, __file__, "--child", str(config_file),
                                       "--words", str(words)], env=env, check=True,
                                      capture_output=True, text=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            uncached.append(runs[0]["ttft_ms"])
            cached.append(runs[1]["ttft_ms"])
            seen = runs
    first, second = statistics.median(uncached), statistics.median(cached)
    print(f"fresh process: {seen[0]['prompt']} prompt tokens; the cold process reused "
          f"{seen[0]['cached']}, the next fresh process restored {seen[1]['cached']} from disk")
    print(f"TTFT role A, fresh process, disk cache empty   {first:8.1f} ms (median of {rounds})")
    print(f"TTFT role A, fresh process, prefix on disk     {second:8.1f} ms")
    print(f"ratio cached/uncached                          {second / first:8.3f}   "
          "(target <= 0.1)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: the starter model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--words", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.words)
    model = args.model or tongyi_local.starter_model_path()
    os.environ["TONGYI_LOCAL_KV_CACHE_BYTES"] = "0"  # in one process: the in-memory cache only
    # ~0.75 words per token for this English text: size the prompts to the target tokens
    words = int(args.system_tokens * 0.75)

    firsts, seconds, evaluated = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(config_for(model, tmp))
        for _ in range(args.rounds):
            registry = Registry(base)
            coder, reviewer = registry.for_role("coder"), registry.for_role("reviewer")
            sys_a, sys_b = system_prompt("A", words), system_prompt("B", words)
            ask = {"temperature": 0, "max_tokens": 1}
            warm = reviewer.complete("Hello", **ask)  # load the model outside the timings
            a1 = coder.chat([{"role": "system", "content": sys_a},
                             {"role": "user", "content": "Review: x = eval(input())"}], **ask)
            reviewer.chat([{"role": "system", "content": sys_b},
                           {"role": "user", "content": "Review: os.system(cmd)"}], **ask)
            a2 = coder.chat([{"role": "system", "content": sys_a},
                             {"role": "user", "content": "Review: pickle.loads(data)"}], **ask)
            firsts.append(a1.timings.ttft_ms)
            seconds.append(a2.timings.ttft_ms)
            evaluated.append((a1.usage.prompt_tokens, a2.timings.prompt_eval_tokens,
                              a2.usage.cached_prompt_tokens))
            registry.close()
            del warm
    first, second = statistics.median(firsts), statistics.median(seconds)
    prompt_tokens, eval_tokens, cached = evaluated[-1]
    print(f"system prompt + question: {prompt_tokens} tokens; role A's second request evaluated "
          f"{eval_tokens} and reused {cached} cached tokens")
    print(f"TTFT role A first request   {first:8.1f} ms (median of {args.rounds})")
    print(f"TTFT role A second request  {second:8.1f} ms (after role B used the model)")
    print(f"ratio second/first          {second / first:8.3f}   (target <= 0.1)")
    fresh_processes(model, words, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
