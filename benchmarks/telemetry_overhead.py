"""Telemetry overhead: tg128-like decode with the OpenTelemetry API installed but no SDK (the no-op
every user without an SDK gets) against telemetry bypassed (``TONGYI_LOCAL_TELEMETRY=0``).

Each round runs both modes back to back, in alternating order, on the starter model (greedy,
``ignore_eos``, 128 tokens), once as ``complete`` and once as a token-by-token ``stream`` (where
the instrumented wrapper sees every chunk). Tokens/s is measured around the whole call, so the
span's start and end count too. Prints the medians and the median of the per-round ratios
(no-op / bypassed; 1.00 means no measurable cost). On a shared CPU those ratios are noise, so it
also times the instrumentation alone (span start and end, metrics, the per-chunk wrapper) on a
128-chunk stream with no model, and prints the ratio that cost implies at the measured decode speed.

    .venv/bin/python benchmarks/telemetry_overhead.py [--rounds 9] [--tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from opentelemetry import trace

from tongyi_local import telemetry
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.store import starter_model
from tongyi_local.types import Chunk, Completion, Request, Sampling, Timings, Usage

MODES = {"api-noop": "1", "bypassed": "0"}


def timed(run: Callable[[], int]) -> float:
    """Tokens/s of one call, measured around the whole call."""
    started = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - started)


def instrumentation_cost_s(n_chunks: int, repeats: int = 2000) -> float:
    """Seconds telemetry (API no-op) adds to one streamed request of ``n_chunks`` chunks."""

    class Model:
        backend, name = "llama", "m"

    request = Request.build(Sampling(), "The")
    final = Chunk("", "length", Completion("", "length", Usage(1, n_chunks),
                                          Timings(ttft_ms=10, decode_ms=1e3,
                                                  decode_tokens=n_chunks), "m"))
    chunks = [Chunk("a")] * (n_chunks - 1) + [final]

    def per_request(mode: str) -> float:
        os.environ[telemetry.TELEMETRY_ENV] = mode
        started = time.perf_counter()
        for _ in range(repeats):
            call = telemetry.start(Model(), request, stream=True)
            for _chunk in call.watch(iter(chunks)):
                pass
        return (time.perf_counter() - started) / repeats

    on = min(per_request("1") for _ in range(3))
    off = min(per_request("0") for _ in range(3))
    return max(on - off, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        raise SystemExit("an OpenTelemetry SDK is configured here; this measures the no-op API")

    gen = LlamaGenerator(starter_model(), n_ctx=512, slots=1)
    n = args.tokens

    def complete() -> int:
        done = gen.complete("The", max_tokens=n, temperature=0, ignore_eos=True)
        assert done.usage.completion_tokens == n
        return n

    def stream() -> int:
        chunks = list(gen.stream("The", max_tokens=n, temperature=0, ignore_eos=True))
        assert chunks[-1].completion.usage.completion_tokens == n
        return n

    complete()  # warm up: first-call costs are not telemetry's
    results: dict[str, dict[str, list[float]]] = {
        kind: {mode: [] for mode in MODES} for kind in ("complete", "stream")}
    for round_no in range(args.rounds):
        order = list(MODES) if round_no % 2 == 0 else list(reversed(MODES))
        for kind, run in (("complete", complete), ("stream", stream)):
            for mode in order:
                os.environ[telemetry.TELEMETRY_ENV] = MODES[mode]
                results[kind][mode].append(timed(run))
    os.environ.pop(telemetry.TELEMETRY_ENV, None)
    gen.close()

    report: dict[str, dict[str, float]] = {}
    print(f"tg{n}, starter model, {args.rounds} interleaved rounds (tokens/s around the call)")
    for kind, modes in results.items():
        ratios = [a / b for a, b in zip(modes["api-noop"], modes["bypassed"])]
        report[kind] = {"api_noop_tps": statistics.median(modes["api-noop"]),
                        "bypassed_tps": statistics.median(modes["bypassed"]),
                        "median_ratio": statistics.median(ratios)}
        r = report[kind]
        print(f"  {kind:8s}  api no-op {r['api_noop_tps']:7.2f} t/s   bypassed "
              f"{r['bypassed_tps']:7.2f} t/s   median ratio {r['median_ratio']:.3f}x")
    cost = instrumentation_cost_s(n)
    os.environ.pop(telemetry.TELEMETRY_ENV, None)
    seconds = n / report["stream"]["bypassed_tps"]
    report["instrumentation"] = {"cost_us_per_request": cost * 1e6,
                                 "implied_ratio": seconds / (seconds + cost)}
    print(f"  instrumentation alone: {cost * 1e6:.1f} us per {n}-chunk request -> implied ratio "
          f"{report['instrumentation']['implied_ratio']:.5f}x at {report['stream']['bypassed_tps']:.1f} t/s")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
