"""Tool calls and structured output on the real llama.cpp: the packaged chat model
(SmolLM2-135M-Instruct, ChatML template without tool support: the fallback tool prompt) and a
tiny random-weight qwen2 GGUF with Qwen2.5's own tool-aware template. Under the grammar even a
random model's calls parse and validate; that is the property these tests hold the engine to."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tongyi_local
from tongyi_local.errors import InvalidRequestError, UnsupportedSchemaError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "City name"},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object",
                   "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
                                  "b": {"type": "integer", "minimum": -100, "maximum": 100}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Random weights write strings until max_tokens unless the schema bounds them.
BOUNDED_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}


def _valid(call, tool):
    jsonschema.validate(call.arguments, tool["function"]["parameters"])
    return True


@pytest.mark.parametrize("seed", range(4))
def test_required_calls_always_parse_and_validate_even_from_random_weights(tiny_qwen_tools, seed):
    done = tiny_qwen_tools.chat(ASK, tools=[BOUNDED_WEATHER, ADD], tool_choice="required",
                                parallel_tool_calls=False, temperature=1.0, seed=seed,
                                max_tokens=300)
    assert done.finish_reason == "tool_calls" and len(done.tool_calls) == 1
    call = done.tool_calls[0]
    tool = {"get_weather": BOUNDED_WEATHER, "add": ADD}[call.name]
    assert _valid(call, tool)


def test_a_named_call_is_that_tool(tiny_qwen_tools):
    done = tiny_qwen_tools.chat(ASK, tools=[BOUNDED_WEATHER, ADD], tool_choice={"name": "add"},
                                temperature=0, max_tokens=300)
    assert [c.name for c in done.tool_calls] == ["add"] and _valid(done.tool_calls[0], ADD)


def test_the_chat_model_calls_the_tool_with_the_city(chat_model):
    done = chat_model.chat(ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                           parallel_tool_calls=False, max_tokens=60)
    assert done.finish_reason == "tool_calls"
    (call,) = done.tool_calls
    assert call.name == "get_weather" and _valid(call, WEATHER)
    assert "paris" in call.arguments["city"].lower()


def test_parallel_calls_in_one_turn_all_parse(chat_model):
    ask = [{"role": "user", "content": "Add 2 and 3, and also add 10 and 20."}]
    done = chat_model.chat(ask, tools=[ADD], tool_choice="required", temperature=0,
                           max_tokens=120)
    # a 135M model repeats calls until max_tokens; the block cut short there is dropped
    assert done.finish_reason in ("tool_calls", "length") and len(done.tool_calls) >= 2
    assert all(c.name == "add" and _valid(c, ADD) for c in done.tool_calls)
    assert len({c.id for c in done.tool_calls}) == len(done.tool_calls)


def test_streamed_tool_calls_show_no_raw_call_text(chat_model):
    chunks = list(chat_model.stream(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                    temperature=0, max_tokens=60))
    assert "<tool_call>" not in "".join(c.text for c in chunks)
    final = chunks[-1]
    assert final.finish_reason == "tool_calls" and final.completion.tool_calls[0].name == "get_weather"


def test_tool_result_round_trip_reaches_a_text_answer(chat_model):
    first = chat_model.chat(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0,
                            max_tokens=60)
    call = first.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments_json}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    rendered = chat_model.render_chat(tongyi_local.types.coerce_messages(history))
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in rendered
    answer = chat_model.chat(history, tools=[WEATHER], tool_choice="none", temperature=0,
                             max_tokens=40)
    assert answer.finish_reason in ("stop", "length") and answer.text.strip()
    assert not answer.tool_calls


def test_run_tools_calls_the_python_function_and_returns_the_transcript(chat_model):
    seen = []

    def get_weather(city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: City name.
        """
        seen.append(city)
        return {"city": city, "temperature_c": 18, "sky": "sunny"}

    run = tongyi_local.run_tools(chat_model, ASK, [get_weather], max_steps=3,
                                 tool_choice="required", parallel_tool_calls=False, temperature=0,
                                 max_tokens=60)
    assert seen and "paris" in seen[0].lower()
    results = [m for m in run.messages if m.role == "tool"]
    assert json.loads(results[0].content)["sky"] == "sunny"
    assert results[0].tool_call_id == run.messages[1].tool_calls[0].id
    assert 2 <= run.steps <= 3 and run.messages[-1].role == "assistant"


def test_run_tools_turns_an_exception_into_a_tool_message(chat_model):
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        raise RuntimeError("weather service down")

    run = tongyi_local.run_tools(chat_model, ASK, [get_weather], max_steps=1,
                                 tool_choice="required", parallel_tool_calls=False, temperature=0,
                                 max_tokens=60)
    assert run.steps == 1 and not run.finished
    run = tongyi_local.run_tools(chat_model, ASK, [get_weather], max_steps=2,
                                 tool_choice="required", parallel_tool_calls=False, temperature=0,
                                 max_tokens=60)
    error = [m for m in run.messages if m.role == "tool"][0]
    assert error.content == "error: get_weather raised RuntimeError: weather service down"


def test_arun_tools_awaits_async_functions(chat_model):
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    run = asyncio.run(tongyi_local.arun_tools(
        chat_model, [{"role": "user", "content": "What is 2 plus 3?"}], [add], max_steps=2,
        tool_choice="required", parallel_tool_calls=False, temperature=0,
                                 max_tokens=60))
    result = [m for m in run.messages if m.role == "tool"][0]
    call = run.messages[1].tool_calls[0]
    assert int(result.content) == call.arguments["a"] + call.arguments["b"]


class Sky(enum.Enum):
    SUNNY = "sunny"
    RAINY = "rainy"


@dataclasses.dataclass
class Forecast:
    city: str
    temperature_c: int
    sky: Sky


def test_response_schema_from_a_dataclass_gives_the_dataclass(chat_model):
    ask = [{"role": "user", "content": "Give the forecast for Paris as JSON."}]
    done = chat_model.chat(ask, response_schema=Forecast, temperature=0, max_tokens=120)
    assert isinstance(done.parsed, Forecast) and isinstance(done.parsed.sky, Sky)
    assert json.loads(done.text)["city"] == done.parsed.city


def test_unsupported_schema_is_refused_before_decoding(tiny_qwen_tools):
    schema = {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}
    before = tiny_qwen_tools.slot_states()
    with pytest.raises(UnsupportedSchemaError) as info:
        tiny_qwen_tools.chat(ASK, response_schema=schema)
    assert info.value.feature == "not" and info.value.pointer == "/properties/x"
    assert tiny_qwen_tools.slot_states() == before


def test_invalid_tool_schema_is_refused_before_decoding(tiny_qwen_tools):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}}}
    with pytest.raises(InvalidRequestError, match="parameters"):
        tiny_qwen_tools.chat(ASK, tools=[bad])


# --- property: constrained output from the real model always parses and validates -----------
_LEAF = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 2000)),
    st.builds(lambda lo: {"type": "integer", "exclusiveMinimum": lo}, st.integers(-50, 50)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 3), st.integers(0, 3)),
    st.just({"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{1,3}$"}),
    st.just({"type": "string", "format": "date"}),
    st.just({"type": "string", "format": "uuid"}),
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=4,
             unique=True).map(lambda xs: {"enum": xs}),
    st.just({"type": "number"}),
)


def _object(children):
    return st.dictionaries(st.sampled_from(["a", "b", "name", "n_2", "x"]), children,
                           min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req,
                         "additionalProperties": False}))


SCHEMAS = st.recursive(
    _LEAF, lambda inner: st.one_of(
        _object(inner),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n},
                  inner, st.integers(0, 3)),
        st.lists(inner, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs})),
    max_leaves=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
# a pick of byte 0xED, after which the grammar allows continuation bytes UTF-8 forbids
@example(schema={"anyOf": [{"type": "string", "minLength": 3, "maxLength": 6},
                           {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{1,3}$"}]},
         seed=18126)
def test_constrained_output_always_parses_and_validates(tiny_qwen_tools, schema, seed):
    done = tiny_qwen_tools.chat([{"role": "user", "content": "Answer in JSON."}],
                                response_schema=schema, temperature=1.0, seed=seed,
                                max_tokens=600)
    jsonschema.validate(json.loads(done.text), schema)
    assert done.parsed == json.loads(done.text)


def test_a_grammar_dead_end_fails_that_request_alone(tiny_qwen_tools):
    """A grammar no token can satisfy (internal API: public requests build their own grammar)
    ends its request with an OutputParseError; accepting a rejected token would abort inside
    llama.cpp. The model keeps serving."""
    import time

    from tongyi_local.backends._jobs import Job, Stream
    from tongyi_local.backends._sequence import Sequence
    from tongyi_local.errors import OutputParseError
    from tongyi_local.types import Sampling

    model = tiny_qwen_tools
    sampler = model._grammar_sampler('root ::= "a" [^\\x00-\\U0010FFFF]')
    job = Job(model.tokenize("hello"), Sequence(model._n_vocab, Sampling(temperature=0), sampler),
              8, time.perf_counter())
    model._engine.submit(job)
    with pytest.raises(OutputParseError, match="no token the grammar allows"):
        list(Stream(job, model._engine.cancel, model._engine.alive, model))
    assert model.complete("hello", max_tokens=3, temperature=0).usage.completion_tokens >= 1
