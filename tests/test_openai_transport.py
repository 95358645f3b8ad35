"""The official openai SDK (sync and async) against the in-process transport, on the real
packaged chat model: nothing on the client's side is mocked."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from pydantic import BaseModel

import tongyi_local
from tongyi_local.registry import pool_key

ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def oa_config(chat_role_config):
    return chat_role_config


@pytest.fixture(scope="module")
def transport(oa_config):
    transport = tongyi_local.openai_transport(oa_config)
    yield transport
    transport.close()


@pytest.fixture(scope="module")
def client(transport):
    return openai.OpenAI(base_url="http://tongyi-local/v1", api_key="local", max_retries=0,
                         http_client=httpx.Client(transport=transport))


def _aclient(oa_config):
    return openai.AsyncOpenAI(base_url="http://tongyi-local/v1", api_key="local", max_retries=0,
                              http_client=httpx.AsyncClient(
                                  transport=tongyi_local.openai_transport(oa_config,
                                                                          asyncio=True)))


def test_models_lists_roles_and_models(client):
    ids = [m.id for m in client.models.list()]
    assert "coder" in ids and "chat" in ids
    assert client.models.retrieve("coder").id == "coder"


def test_chat_answers_as_the_library_does(client, oa_config):
    answer = client.chat.completions.create(model="coder", messages=ASK, max_tokens=24)
    choice = answer.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert answer.model == "coder" and answer.object == "chat.completion"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    own = tongyi_local.for_role("coder", config_path=oa_config).chat(ASK, max_tokens=24)
    assert own.text == choice.message.content  # greedy: the very same tokens


def test_streaming_gives_the_same_text_and_final_usage(client):
    whole = client.chat.completions.create(model="coder", messages=ASK, max_tokens=24)
    stream = client.chat.completions.create(model="coder", messages=ASK, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: KV reused


def test_text_completions_sync_and_streamed(client):
    done = client.completions.create(model="chat", prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert done.choices[0].text and done.object == "text_completion"
    parts = list(client.completions.create(model="chat", prompt="The capital of France is",
                                           max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text


def test_tool_call_round_trip(client):
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="coder", messages=asked, tools=WEATHER,
                                           tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    follow = client.chat.completions.create(model="coder", max_tokens=32, tools=WEATHER, messages=[
        *asked, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}])
    assert follow.choices[0].message.content


def test_streamed_tool_call_arrives_whole(client):
    chunks = list(client.chat.completions.create(
        model="coder", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=WEATHER,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, max_tokens=64, stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


class City(BaseModel):
    name: str
    country: str


def test_structured_output_parses_into_the_pydantic_model(client):
    done = client.chat.completions.parse(model="coder", max_tokens=48, response_format=City,
                                         messages=[{"role": "user", "content":
                                                    "Give the capital of France as JSON."}])
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_json_object_mode_gives_a_json_object(client):
    done = client.chat.completions.create(model="coder", max_tokens=48,
                                          response_format={"type": "json_object"},
                                          messages=[{"role": "user",
                                                     "content": "Describe Paris in JSON."}])
    assert isinstance(json.loads(done.choices[0].message.content), dict)


def test_errors_come_back_as_the_sdks_own_exceptions(client):
    with pytest.raises(openai.NotFoundError) as found:
        client.chat.completions.create(model="no-such-role", messages=ASK)
    assert "no-such-role" in found.value.message and found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model="coder", max_tokens=8, messages=[
            {"role": "user", "content": "word " * 3000}])
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="coder", messages=ASK, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="coder", messages=ASK, n=2)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="coder", messages=ASK, tool_choice="required")


def test_malformed_requests_get_openai_error_bodies(transport):
    with httpx.Client(transport=transport, base_url="http://tongyi-local") as raw:
        bad = raw.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert raw.post("/v1/chat/completions", json={"model": "coder"}).json()["error"][
            "param"] == "messages"
        assert raw.get("/v1/nothing").status_code == 404
        assert raw.get("/v1/chat/completions").status_code == 405
        assert raw.get("/health").json()["status"] == "ok"


def _busy(transport, oa_config) -> bool:
    registry = transport.app.registry
    model = registry.config.models["chat"]
    with registry.pool.checkout(pool_key(model), model, model.name, "test") as gen:
        return any(s.busy for s in gen.slot_states())


def _wait_idle(transport, oa_config, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _busy(transport, oa_config):
            return True
        time.sleep(0.05)
    return False


def test_closing_a_stream_frees_its_slot(client, transport, oa_config):
    stream = client.chat.completions.create(model="coder", messages=ASK, max_tokens=400,
                                            stream=True, extra_body={"ignore_eos": True})
    next(iter(stream)), next(iter(stream))
    assert _busy(transport, oa_config)
    stream.close()
    assert _wait_idle(transport, oa_config), "the slot stayed busy after the stream was closed"


def test_async_client_chat_stream_and_cancellation(client, transport, oa_config):
    whole = client.chat.completions.create(model="coder", messages=ASK, max_tokens=24)

    async def run():
        aclient = _aclient(oa_config)
        done = await aclient.chat.completions.create(model="coder", messages=ASK, max_tokens=24)
        parts = [c.choices[0].delta.content or "" async for c in
                 await aclient.chat.completions.create(model="coder", messages=ASK,
                                                       max_tokens=24, stream=True)]

        async def long_stream():
            stream = await aclient.chat.completions.create(
                model="coder", messages=ASK, max_tokens=400, stream=True,
                extra_body={"ignore_eos": True})
            async for _ in stream:
                pass

        task = asyncio.create_task(long_stream())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(openai.NotFoundError):
            await aclient.chat.completions.create(model="nope", messages=ASK)
        await aclient.close()
        return done, "".join(parts)

    done, streamed = asyncio.run(run())
    assert done.choices[0].message.content == whole.choices[0].message.content == streamed
    assert _wait_idle(transport, oa_config), "the slot stayed busy after the task was cancelled"
