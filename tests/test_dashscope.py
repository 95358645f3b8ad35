"""DashScope backend: the real ``dashscope`` SDK over real HTTP to a server on 127.0.0.1.

DashScope itself is unreachable here, so the other end is tests/servers/scripted.py, which speaks
DashScope's protocol (paths, Bearer auth, SSE events) and can be told to fail; everything on our
side (SDK, requests, sockets, retry, error mapping) is the real thing.
"""

from __future__ import annotations

import logging
import time

import dashscope
import pytest

from tests.servers import scripted
from tests.servers.scripted import ScriptedServer, Step, drop, slow, status, text, tool_call
from tongyi_local.backends.dashscope import DashScopeGenerator
from tongyi_local.backends.retry import RetryPolicy
from tongyi_local.errors import (AuthenticationError, ConfigError, RateLimitError,
                                 RemoteConnectionError, RemoteTimeoutError, ResponseFormatError,
                                 ServerError, TongyiError)
from tongyi_local.types import Generator, Message, ToolCall

KEY = "sk-test-5ecret0key0never0shown"
PROMPT = "PRIVATE-PROMPT-about-project-zebra"
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, max_total_s=5.0)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture
def server():
    srv = ScriptedServer("dashscope", api_key=KEY)
    yield srv
    srv.close()


@pytest.fixture
def gen(server):
    g = DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url, retry=FAST)
    yield g
    g.close()


@pytest.fixture
def free_port():
    return scripted.free_port()


def posts(server):
    return server.generation_requests()


def test_chat_result_usage_timings_and_the_request_on_the_wire(gen, server):
    c = gen.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
                 temperature=0, max_tokens=16, stop=["END"], seed=3, top_k=0)
    assert isinstance(gen, Generator) and gen.remote is True
    assert c.text == "Hello world" and c.finish_reason == "stop" and c.model == "dashscope:qwen-test"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_prompt_tokens) == (7, 2, 3)
    assert 0 < c.timings.ttft_ms <= c.timings.total_ms and c.timings.decode_tokens == 1
    (req,) = posts(server)
    assert req.path == "/api/v1/services/aigc/text-generation/generation"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["X-DashScope-SSE"] == "enable"
    assert req.body["model"] == "qwen-test"
    assert req.body["input"]["messages"][1] == {"role": "user", "content": PROMPT}
    params = req.body["parameters"]
    assert params["incremental_output"] is True and params["result_format"] == "message"
    assert (params["temperature"], params["max_tokens"], params["stop"], params["seed"]) == (0, 16, ["END"], 3)
    assert "top_k" not in params and "repetition_penalty" not in params


def test_complete_sends_a_prompt_input_and_the_sdk_global_base_url_is_honoured(server, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", server.url)
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)  # read at call time, not at import
    with DashScopeGenerator("qwen-test", retry=FAST) as g:
        assert g.complete("Once upon a time", max_tokens=4).text == "Hello world"
    assert posts(server)[0].body["input"] == {"prompt": "Once upon a time"}


def test_stream_yields_incremental_pieces_and_ends_with_the_completion(gen, server):
    server.script(text("Hel", "lo", " there", usage=(5, 3)))
    chunks = list(gen.stream([{"role": "user", "content": "hi"}]))
    assert [c.text for c in chunks[:-1]] == ["Hel", "lo", " there"]
    final = chunks[-1].completion
    assert final.text == "Hello there" and chunks[-1].finish_reason == "stop"
    assert final.usage.completion_tokens == 3 and final.timings.ttft_ms <= final.timings.total_ms


def test_tool_call_round_trip(gen, server):
    server.script(tool_call("get_weather", '{"city"', ': "Paris"}'), text("Sunny."))
    first = gen.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert first.finish_reason == "tool_calls"
    assert first.tool_calls == (ToolCall("call_abc", "get_weather", '{"city": "Paris"}'),)
    assert posts(server)[0].body["parameters"]["tools"] == [WEATHER]
    history = [Message("user", "Weather in Paris?"),
               Message("assistant", "", tool_calls=first.tool_calls),
               Message("tool", '{"sky": "sunny"}', tool_call_id="call_abc")]
    assert gen.chat(history, tools=[WEATHER]).text == "Sunny."
    sent = posts(server)[1].body["input"]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": '{"city": "Paris"}'}
    assert sent[2] == {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "call_abc"}


def test_429_then_success_is_retried(gen, server, caplog):
    caplog.set_level(logging.INFO, logger="tongyi_local.retry")
    server.script(status(429, "Throttling.RateQuota", "Requests rate limit exceeded"), text("ok"))
    assert gen.complete("hi").text == "ok"
    assert len(posts(server)) == 2
    (record,) = [r for r in caplog.records if hasattr(r, "retry")]
    assert record.retry["reason"] == "RateLimitError" and record.retry["status"] == 429


def test_repeated_500_exhausts_the_retries(gen, server):
    server.script(*[status(500, "InternalError", "boom")] * 5)
    with pytest.raises(ServerError, match="gave up after 3 attempts") as info:
        gen.complete("hi")
    assert info.value.status == 500 and info.value.attempts == 3 and info.value.request_id
    assert len(posts(server)) == 3


def test_retries_stop_when_the_total_time_budget_is_spent(server):
    server.default = status(503, "ServiceUnavailable", "overloaded")
    policy = RetryPolicy(max_attempts=50, base_delay_s=0.2, max_delay_s=0.2, max_total_s=0.5)
    g = DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url, retry=policy)
    start = time.monotonic()
    with pytest.raises(ServerError):
        g.complete("hi")
    assert time.monotonic() - start < 3 and 1 < len(posts(server)) < 10


def test_rate_limit_surfaces_as_its_own_error(server):
    server.default = status(429, "Throttling", "slow down", retry_after="0")
    g = DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url,
                           retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
    with pytest.raises(RateLimitError, match="throttling"):
        g.complete("hi")


def test_auth_failure_is_not_retried_and_does_not_echo_the_key(server):
    wrong = "sk-wrong-key-1234567890abcdef"
    g = DashScopeGenerator("qwen-test", api_key=wrong, base_url=server.url, retry=FAST)
    with pytest.raises(AuthenticationError, match="rejected the API key") as info:
        g.complete("hi")
    assert len(posts(server)) == 1 and info.value.status == 401
    assert wrong not in str(info.value) and "DASHSCOPE_API_KEY" in str(info.value)


def test_missing_key_is_a_clear_error_before_any_request(server, monkeypatch):
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    g = DashScopeGenerator("qwen-test", base_url=server.url)
    with pytest.raises(AuthenticationError, match="set DASHSCOPE_API_KEY"):
        g.stream("hi")  # raised when the stream is asked for, not on the first chunk
    assert server.requests == [] and g.health() is False


@pytest.mark.parametrize("step", [Step("malformed_stream"), Step("malformed_json"),
                                  Step("no_output")], ids=lambda s: s.kind)
def test_malformed_responses_are_a_clear_error_and_not_retried(gen, server, step):
    server.script(step)
    with pytest.raises(ResponseFormatError, match="base_url") as info:
        gen.complete("hi")
    assert "Traceback" not in str(info.value) and len(posts(server)) == 1


def test_slow_response_hits_the_timeout(server):
    server.script(slow(5), slow(5))
    g = DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url, timeout_s=0.3,
                           retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="within 0.3 s") as info:
        g.complete("hi")
    assert time.monotonic() - start < 3 and info.value.attempts == 2
    assert isinstance(info.value, TimeoutError) and len(posts(server)) == 2


def test_a_stream_cut_after_text_surfaces_instead_of_retrying(gen, server):
    server.script(drop("Hel", "lo"))
    seen = []
    with pytest.raises(RemoteConnectionError, match="dropped mid-answer"):
        for chunk in gen.stream("hi"):
            seen.append(chunk.text)
    assert seen == ["Hel", "lo"] and len(posts(server)) == 1


def test_unreachable_endpoint_is_a_clear_error(free_port):
    g = DashScopeGenerator("qwen-test", api_key=KEY, base_url=f"http://127.0.0.1:{free_port}/api/v1",
                           retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
    with pytest.raises(RemoteConnectionError, match="cannot reach DashScope") as info:
        g.complete("hi")
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, TongyiError)
    assert g.health() is False


def test_health_answers_true_only_for_a_working_endpoint_and_key(gen, server):
    assert gen.health() is True
    assert server.requests[-1].path.startswith("/api/v1/models")
    assert DashScopeGenerator("qwen-test", api_key="sk-bad-000000", base_url=server.url).health() is False


def test_bad_construction_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="model name"):
        DashScopeGenerator("")
    with pytest.raises(ConfigError, match="timeout_s"):
        DashScopeGenerator("qwen-plus", timeout_s=0)
    with pytest.raises(ConfigError, match="unknown retry"):
        DashScopeGenerator("qwen-plus", retry={"attempts": 3})


def test_the_key_and_prompt_never_reach_logs_errors_or_repr(server, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)  # the SDK and urllib3 log at DEBUG too
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    g = DashScopeGenerator("qwen-test", base_url=server.url, timeout_s=0.3,
                           retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
    errors = []
    server.script(text("OUTPUT-quokka"), status(500), status(500), slow(3), slow(3), Step("malformed_json"))
    for _ in range(4):
        try:
            list(g.stream([{"role": "user", "content": PROMPT}]))
        except TongyiError as e:
            errors.append(e)
    assert g.health() is True
    assert [type(e) for e in errors] == [ServerError, RemoteTimeoutError, ResponseFormatError]
    shown = caplog.text + "".join(f"{e}{e!r}" for e in errors) + repr(g) + str(vars(g))
    assert KEY not in shown and PROMPT not in shown and "OUTPUT-quokka" not in caplog.text
    assert any(r.name.startswith("dashscope") or r.name.startswith("urllib3")
               for r in caplog.records)  # the SDK did log; its records were cleaned


def test_retry_policy_backoff_is_bounded_and_jittered():
    from random import Random

    from tongyi_local.errors import RemoteError

    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=2.0)
    err = ServerError("x")
    delays = [policy.delay_s(a, err, Random(a)) for a in range(1, 8)]
    assert all(0 <= d <= min(2.0, 0.5 * 2 ** (a - 1)) for a, d in zip(range(1, 8), delays))
    assert len(set(delays)) > 1
    assert policy.delay_s(1, RemoteError("x", retry_after_s=10), Random(0)) == 2.0
    assert RetryPolicy.coerce({"max_attempts": 2}).max_attempts == 2
    with pytest.raises(ConfigError):
        RetryPolicy(max_attempts=0)
