"""Constrained decoding: decode speed under a tool-call grammar (and a response schema) against
free decoding on the packaged chat model, measured side by side in one run, plus the parse rate
of required tool calls.

    .venv/bin/python benchmarks/constrained.py [--rounds 7] [--calls 50] [--json out.json]

Each round decodes, interleaved: a required tool call (grammar from the tool's JSON schema) and a
structured answer (grammar from a response schema), each against free decoding (``ignore_eos``)
of the very same prompt for the same number of tokens. Figures are decode tokens/s from the
results' own timings; ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics

import tongyi_local
from tongyi_local import build, hardware
from tongyi_local.chat_format import with_schema_instruction, with_tool_prompt
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.errors import TongyiError
from tongyi_local.store import starter_chat_model
from tongyi_local.types import Tool, coerce_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}}}
FORECAST = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "days": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "day": {"type": "string", "maxLength": 12},
        "high_c": {"type": "integer", "minimum": -60, "maximum": 60},
        "sky": {"enum": ["sunny", "cloudy", "rainy"]}},
        "required": ["day", "high_c", "sky"], "additionalProperties": False}}},
    "required": ["city", "days"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def decode_rate(done: tongyi_local.Completion) -> float:
    return done.timings.decode_tokens_per_s


def one_round(model: LlamaGenerator) -> dict[str, float]:
    """Each constrained answer against free decoding of the very same prompt (the tool list or
    the schema instruction in the system turn, as the library renders it) and length, so the
    ratio is the grammar's cost alone, not a longer context's."""
    tool = model.chat(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                      temperature=0, max_tokens=120)
    schema = model.chat(ASK, response_schema=FORECAST, temperature=0, max_tokens=240)
    messages = coerce_messages(ASK)
    free_tool = model.chat(with_tool_prompt(messages, [Tool.coerce(WEATHER)]), temperature=0,
                           max_tokens=tool.usage.completion_tokens, ignore_eos=True)
    free_schema = model.chat(with_schema_instruction(messages, FORECAST), temperature=0,
                             max_tokens=schema.usage.completion_tokens, ignore_eos=True)
    assert free_tool.usage.prompt_tokens == tool.usage.prompt_tokens  # the same prompt
    return {"free": decode_rate(free_tool), "tool": decode_rate(tool),
            "free_schema": decode_rate(free_schema), "schema": decode_rate(schema),
            "tool_tokens": tool.usage.completion_tokens,
            "schema_tokens": schema.usage.completion_tokens}


def parse_rate(model: LlamaGenerator, calls: int) -> tuple[int, list[str]]:
    """Required tool calls at temperature 0.8 with different seeds (parallel calls allowed): how
    many answers come back with calls that all parse and validate."""
    import jsonschema

    ok, failures = 0, []
    for seed in range(calls):
        try:
            done = model.chat(ASK, tools=[WEATHER], tool_choice="required", temperature=0.8,
                              seed=seed, max_tokens=200)
            if not done.tool_calls:
                raise ValueError("no tool call")
            for call in done.tool_calls:
                jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])
            ok += 1
        except (TongyiError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"seed {seed}: {type(exc).__name__}: {exc}"[:200])
    return ok, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    path = starter_chat_model()
    record = build.installed_build() or {}
    topo = hardware.read_topology()
    model = LlamaGenerator(path, n_ctx=2048, slots=1)
    one_round(model)  # warm-up: pages in the weights, fills the caches
    rounds = [one_round(model) for _ in range(args.rounds)]
    ok, failures = parse_rate(model, args.calls)
    model.close()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    tool_ratio = statistics.median(r["tool"] / r["free"] for r in rounds)
    schema_ratio = statistics.median(r["schema"] / r["free_schema"] for r in rounds)
    result = {
        "cpu": topo.model_name, "preset": record.get("preset", "?"), "model": path.name,
        "threads": model.thread_plan.threads, "rounds": args.rounds,
        "free_decode_tps": median("free"), "free_schema_decode_tps": median("free_schema"),
        "tool_decode_tps": median("tool"),
        "schema_decode_tps": median("schema"), "tool_vs_free": tool_ratio,
        "schema_vs_free": schema_ratio, "tool_tokens": median("tool_tokens"),
        "schema_tokens": median("schema_tokens"), "required_calls": args.calls,
        "required_calls_parsed": ok, "failures": failures}
    print(f"{result['cpu']}, preset {result['preset']}, {result['threads']} threads, "
          f"{result['model']}, {args.rounds} rounds (medians)")
    print(f"  free decode (tool prompt)   {result['free_decode_tps']:8.1f} t/s")
    print(f"  free decode (schema prompt) {result['free_schema_decode_tps']:8.1f} t/s")
    print(f"  tool-call grammar           {result['tool_decode_tps']:8.1f} t/s   ratio "
          f"{tool_ratio:.3f}  (target >= 0.9; {result['tool_tokens']:.0f} tokens)")
    print(f"  response-schema grammar     {result['schema_decode_tps']:8.1f} t/s   ratio "
          f"{schema_ratio:.3f}  ({result['schema_tokens']:.0f} tokens)")
    print(f"  required calls parsed       {ok}/{args.calls} ({100 * ok / args.calls:.0f} %)")
    for failure in failures:
        print(f"    {failure}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
