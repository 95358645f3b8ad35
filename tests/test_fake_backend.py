"""FakeGenerator: the scripted backend shipped for users' own tests. It is itself the thing under
test here, so these tests use it directly."""

from __future__ import annotations

import pytest

from tongyi_local.backends.fake import FakeGenerator, FakeReply
from tongyi_local.errors import (BackendError, ConfigError, GeneratorClosedError,
                                 InvalidRequestError, ModelLoadError, RemoteTimeoutError)
from tongyi_local.types import Generator, Sampling, Tool, ToolCall

TOOL = {"type": "function", "function": {"name": "search", "parameters": {}}}


def test_text_streams_word_by_word_and_calls_are_recorded():
    fake = FakeGenerator(["Hello there  world"], name="scripted")
    assert isinstance(fake, Generator) and fake.remote is False and fake.health()
    chunks = list(fake.stream([{"role": "user", "content": "hi you"}], max_tokens=10, tools=[TOOL]))
    assert [c.text for c in chunks[:-1]] == ["Hello", " there", " ", " world"]
    final = chunks[-1].completion
    assert final.text == "Hello there  world" and final.finish_reason == "stop"
    assert final.model == "scripted" and final.usage.completion_tokens == 4
    assert final.usage.prompt_tokens == 2 and final.timings.total_ms >= final.timings.ttft_ms
    (call,) = fake.calls
    assert call.messages[0].content == "hi you" and call.sampling.max_tokens == 10
    assert call.tools == (Tool.coerce(TOOL),) and call.prompt is None


def test_explicit_chunks_max_tokens_and_finish_reason():
    fake = FakeGenerator([FakeReply(chunks=["a", "b", "c"]), FakeReply(text="x", finish_reason="length")])
    short = fake.complete("p", max_tokens=2)
    assert short.text == "ab" and short.finish_reason == "length"
    assert fake.complete("p").finish_reason == "length"
    assert fake.calls[0].prompt == "p" and fake.calls[0].sampling.max_tokens == 2


def test_tool_calls_from_objects_and_mappings():
    fake = FakeGenerator([
        FakeReply(tool_calls=[ToolCall("c1", "search", '{"q": "x"}')]),
        {"tool_calls": [{"name": "search", "arguments": {"q": "y"}}]},
    ])
    first = fake.chat([{"role": "user", "content": "find"}], tools=[TOOL])
    second = fake.chat([{"role": "user", "content": "find"}], tools=[TOOL])
    assert first.finish_reason == "tool_calls" and first.tool_calls == (ToolCall("c1", "search", '{"q": "x"}'),)
    assert second.tool_calls == (ToolCall("call_0", "search", '{"q": "y"}'),)


def test_scripted_errors_at_the_start_and_mid_stream():
    fake = FakeGenerator([
        RemoteTimeoutError("no answer", backend="x"),
        ValueError,
        {"error": "RemoteTimeoutError", "message": "slow cloud"},
        {"error": "ModelLoadError", "message": "bad file"},
        FakeReply(text="one two three", error=ConnectionResetError("cut"), error_after=2),
    ])
    with pytest.raises(RemoteTimeoutError, match="no answer"):
        fake.complete("p")
    with pytest.raises(ValueError):
        fake.complete("p")
    with pytest.raises(RemoteTimeoutError, match="slow cloud") as info:
        fake.complete("p")
    assert info.value.backend == "fake"
    with pytest.raises(ModelLoadError, match="bad file"):
        fake.complete("p")
    seen = []
    with pytest.raises(ConnectionResetError):
        for chunk in fake.stream("p"):
            seen.append(chunk.text)
    assert seen == ["one", " two"] and len(fake.calls) == 5


def test_running_out_is_a_clear_error_unless_a_default_is_given():
    fake = FakeGenerator(["only"])
    fake.complete("p")
    with pytest.raises(BackendError, match="no scripted reply left for call 2"):
        fake.complete("p")
    fake.add("later")
    assert fake.complete("p").text == "later"
    assert FakeGenerator(default="same").complete("p").text == "same"


def test_requests_are_validated_and_closing_is_enforced():
    fake = FakeGenerator(default="x", remote=True, healthy=False, sampling=Sampling(max_tokens=3))
    assert fake.remote is True and fake.health() is False
    with pytest.raises(InvalidRequestError, match="temprature"):
        fake.complete("p", temprature=0)
    assert fake.calls == []
    fake.complete("p")
    assert fake.calls[0].sampling.max_tokens == 3
    fake.close()
    with pytest.raises(GeneratorClosedError):
        fake.complete("p")


def test_bad_scripts_are_config_errors():
    with pytest.raises(ConfigError, match="unknown fake reply field"):
        FakeGenerator([{"txt": "typo"}])
    with pytest.raises(ConfigError, match="is not a class in tongyi_local.errors"):
        FakeGenerator([{"error": "NoSuchError"}]).complete("p")
    with pytest.raises(ConfigError, match="a fake reply is"):
        FakeGenerator([42])
