"""The OpenAI SDK through the in-process transport against the library's own ``stream``: decode
rate and time to first token on the packaged chat model, measured side by side in one run.

    .venv/bin/python benchmarks/openai_transport.py [--rounds 7] [--tokens 128] [--json out.json]

Both sides are timed the same way, from the caller's seat: TTFT is the wall time from the call
to the first text, the decode rate is the tokens after the first over the time after it. Each
round asks both (alternating which goes first) with a prompt of its own, so every request
evaluates its prompt; greedy, ``ignore_eos`` and the same ``max_tokens`` give equal lengths.
Ratios are medians of the per-round ratios; the TTFT overhead is the median per-round difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai

import tongyi_local
from tongyi_local import build, hardware
from tongyi_local.store import starter_chat_model

Timed = tuple[float, float, int]  # ttft_s, decode_s (after the first text), tokens


def _time(pieces: Iterator[str], started: float, tokens: Callable[[], int]) -> Timed:
    first = last = None
    for text in pieces:
        if text:
            now = time.perf_counter()
            first = first or now
            last = now
    assert first is not None and last is not None, "no text came back"
    return first - started, last - first, tokens()


def library(role: tongyi_local.Generator, messages: list, n: int) -> Timed:
    done: list[tongyi_local.Completion] = []

    def texts() -> Iterator[str]:
        for chunk in role.stream(messages, max_tokens=n, temperature=0, ignore_eos=True):
            if chunk.completion is not None:
                done.append(chunk.completion)
            yield chunk.text

    return _time(texts(), time.perf_counter(), lambda: done[0].usage.completion_tokens)


def sdk(client: openai.OpenAI, messages: list, n: int) -> Timed:
    usage: list[int] = []

    def texts() -> Iterator[str]:
        for chunk in client.chat.completions.create(
                model="bench", messages=messages, max_tokens=n, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if chunk.usage is not None:
                usage.append(chunk.usage.completion_tokens)
            if chunk.choices:
                yield chunk.choices[0].delta.content or ""

    return _time(texts(), time.perf_counter(), lambda: usage[0])


def rate(t: Timed) -> float:
    ttft, decode_s, tokens = t
    return (tokens - 1) / decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ttft-rounds", type=int, default=21)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    path = starter_chat_model()
    config = Path(tempfile.mkdtemp()) / "models.toml"
    config.write_text(f'[models.bench]\nsource = "path"\npath = "{path}"\n'
                      f'context_length = 2048\n')
    transport = tongyi_local.openai_transport(config)
    client = openai.OpenAI(base_url="http://tongyi-local/v1", api_key="local", max_retries=0,
                           http_client=httpx.Client(transport=transport))
    role = transport.app.generator("bench")  # the very generator the SDK's requests reach

    def ask(i: int) -> list:
        return [{"role": "user", "content": f"Request {i}: write a short story about a lighthouse "
                                             "keeper and the sea."}]

    library(role, ask(-1), 16), sdk(client, ask(-2), 16)  # load and warm up
    rows = []
    for i in range(args.rounds):
        order = [("library", library, role), ("sdk", sdk, client)]
        if i % 2:
            order.reverse()
        got = {name: fn(target, ask(i * 2 + k), args.tokens)
               for k, (name, fn, target) in enumerate(order)}
        rows.append({"library_tps": rate(got["library"]), "sdk_tps": rate(got["sdk"]),
                     "library_ttft_ms": got["library"][0] * 1e3,
                     "sdk_ttft_ms": got["sdk"][0] * 1e3})
    ratio = statistics.median(r["sdk_tps"] / r["library_tps"] for r in rows)
    overhead = statistics.median(r["sdk_ttft_ms"] - r["library_ttft_ms"] for r in rows)
    # TTFT again with the prompt's KV reused (the same prompt each time, one token): what is left
    # is the path to the first token, so the transport's share stands out of the prompt's noise.
    same = ask(-3)
    cached = []
    for i in range(args.ttft_rounds):
        pair = [("library", library, role), ("sdk", sdk, client)]
        if i % 2:
            pair.reverse()
        got = {name: fn(target, same, 2)[0] * 1e3 for name, fn, target in pair}
        cached.append(got["sdk"] - got["library"])
    cached_overhead = statistics.median(cached)
    record = build.installed_build() or {}
    result = {"cpu": hardware.read_topology().model_name, "preset": record.get("preset", "?"),
              "model": path.name, "tokens": args.tokens, "rounds": rows,
              "decode_ratio": ratio, "ttft_overhead_ms": overhead,
              "ttft_overhead_cached_prompt_ms": cached_overhead}
    print(f"{result['cpu']}, preset {result['preset']}, {path.name}, {args.tokens} tokens, "
          f"{args.rounds} rounds")
    print(f"{'round':>5} {'library t/s':>12} {'sdk t/s':>10} {'library TTFT':>13} {'sdk TTFT':>10}")
    for i, r in enumerate(rows):
        print(f"{i:>5} {r['library_tps']:>12.1f} {r['sdk_tps']:>10.1f} "
              f"{r['library_ttft_ms']:>11.1f}ms {r['sdk_ttft_ms']:>8.1f}ms")
    print(f"decode through the SDK + transport: {ratio:.3f}x of the library's own stream "
          f"(target >= 0.97)")
    print(f"TTFT overhead: {overhead:+.2f} ms with the prompt evaluated, "
          f"{cached_overhead:+.2f} ms with its KV reused ({args.ttft_rounds} pairs; "
          f"target <= 5 ms)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
