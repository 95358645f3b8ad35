"""Per-role prompt cache: TTFT of a role's second request after another role used the same model.

Two roles share one model (the starter model by default), each with a ~1,000-token system prompt.
Role A asks (cold), role B asks (its own system prompt), role A asks again: A's second request must
not re-evaluate A's system prompt. Target: second TTFT <= 0.1x the first. Medians over rounds,
each round on a freshly loaded model.

    .venv/bin/python benchmarks/role_cache.py [--rounds 5] [--system-tokens 1000]
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: the starter model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=1000)
    args = parser.parse_args()
    model = args.model or tongyi_local.starter_model_path()

    firsts, seconds, evaluated = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "models.toml"
        config_file.write_text(f'[models.shared]\nsource = "path"\npath = "{model}"\n'
                               'context_length = 4096\n[roles.coder]\nmodel = "shared"\n'
                               '[roles.reviewer]\nmodel = "shared"\n')
        base = load_config(config_file)
        # ~0.75 words per token for this English text: size the prompts to the target tokens
        words = int(args.system_tokens * 0.75)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
