"""The OpenAI wire shapes, as properties: any request body is a typed call or a 400 naming the
field; any result becomes a body the official SDK's own types accept."""

from __future__ import annotations

import json

import openai.types as ot
import openai.types.chat as oc
from hypothesis import given, settings
from hypothesis import strategies as st

from tongyi_local.errors import InvalidRequestError
from tongyi_local.openai_api import wire
from tongyi_local.openai_api.app import OpenAIApp, error_reply
from tongyi_local.types import Chunk, Completion, Timings, ToolCall, Usage

_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 5) | st.floats(-2, 3)
                     | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                           "developer", "tool", "x"]),
                                  "content": st.one_of(st.text(max_size=8), st.none(), _json)})
_body = st.fixed_dictionaries(
    {"model": st.one_of(st.just("coder"), _json)},
    optional={"messages": st.one_of(st.lists(_message, max_size=3), _json),
              "temperature": _json, "top_p": _json, "max_tokens": _json, "stop": _json,
              "n": _json, "stream": _json, "tools": _json, "tool_choice": _json,
              "response_format": st.one_of(_json, st.fixed_dictionaries(
                  {"type": st.sampled_from(["text", "json_object", "json_schema", "x"])})),
              "logprobs": _json, "seed": _json, "stream_options": _json})


@settings(max_examples=300, deadline=None)
@given(_body)
def test_any_chat_body_is_a_call_or_an_invalid_request(body):
    try:
        call = wire.chat_call(body)
    except InvalidRequestError as exc:
        reply = error_reply(exc)
        assert reply.status == 400 and json.loads(reply.body)["error"]["message"]
        return
    assert call.model == "coder" and call.messages
    assert set(call.options) <= {"temperature", "top_p", "seed", "top_k", "min_p",
                                 "repeat_penalty", "ignore_eos", "max_tokens", "stop"}


_calls = st.lists(st.builds(ToolCall, id=st.text("abc123", min_size=1, max_size=6),
                            name=st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                            arguments=st.dictionaries(st.text(max_size=4), st.integers())),
                  max_size=2)
_completions = st.builds(
    Completion, text=st.text(max_size=20),
    finish_reason=st.sampled_from(["stop", "length", "tool_calls"]),
    usage=st.builds(Usage, prompt_tokens=st.integers(0, 99), completion_tokens=st.integers(0, 99),
                    cached_prompt_tokens=st.integers(0, 9)),
    timings=st.just(Timings()), tool_calls=_calls.map(tuple))


@settings(max_examples=100, deadline=None)
@given(_completions, st.booleans())
def test_every_result_is_a_body_the_sdk_accepts(completion, include_usage):
    ids = wire.ResponseIds("coder")
    chat = oc.ChatCompletion.model_validate(wire.chat_body(completion, ids))
    message = chat.choices[0].message
    assert (message.content or "") == completion.text
    assert [(c.id, c.function.name, json.loads(c.function.arguments))
            for c in message.tool_calls or ()] == [(c.id, c.name, c.arguments)
                                                    for c in completion.tool_calls]
    assert chat.usage.prompt_tokens_details.cached_tokens == completion.usage.cached_prompt_tokens
    if completion.finish_reason != "tool_calls":  # text completions take no tools
        text = ot.Completion.model_validate(wire.text_body(completion, wire.ResponseIds("c")))
        assert text.choices[0].text == completion.text
    events = wire.ChatEvents(ids, include_usage)
    stream = [events.start(), events.text(Chunk(completion.text)), *events.end(completion)]
    datas = [e.decode().removeprefix("data: ").strip() for e in stream if e]
    assert datas[-1] == "[DONE]"
    chunks = [oc.ChatCompletionChunk.model_validate(json.loads(d)) for d in datas[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == completion.text
    assert (chunks[-1].usage is not None) == include_usage


def test_routes_answer_without_a_model_loaded(tmp_path):
    config = tmp_path / "models.toml"
    config.write_text('[models.fake]\nbackend = "fake"\nreplies = ["hello there"]\n'
                      '[roles.coder]\nmodel = "fake"\n')
    app = OpenAIApp(config)
    listed = json.loads(app.handle("GET", "/v1/models", b"").body)
    assert {m["id"] for m in listed["data"]} >= {"coder", "fake"}
    done = app.handle("POST", "/v1/chat/completions", json.dumps(
        {"model": "coder", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert done.status == 200
    assert json.loads(done.body)["choices"][0]["message"]["content"] == "hello there"
    assert app.handle("GET", "/v1/models/nope", b"").status == 404


def test_a_model_that_does_not_fit_is_503_overloaded_for_the_sdk(tmp_path, chat_model_path):
    import httpx
    import openai

    from tongyi_local.config import load_config
    from tongyi_local.openai_api import OpenAITransport
    from tongyi_local.pool import ModelPool
    from tongyi_local.registry import Registry, estimate_model, load_model

    config = tmp_path / "models.toml"
    config.write_text(f'[models.chat]\nsource = "path"\npath = "{chat_model_path}"\n')
    registry = Registry(load_config(config),
                        pool=ModelPool(load_model, estimate_model, budget_bytes=1 << 20))
    client = openai.OpenAI(base_url="http://tongyi-local/v1", api_key="local", max_retries=0,
                           http_client=httpx.Client(
                               transport=OpenAITransport(OpenAIApp(registry=registry))))
    try:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    except openai.InternalServerError as exc:
        assert exc.status_code == 503 and exc.code == "overloaded"
    else:
        raise AssertionError("a model beyond the memory budget was served")
