"""OpenAI-compatible backend against a real server process: llama-cpp-python's own server on
127.0.0.1 serving the starter model (chat, stream, tool calls, health), plus the scripted server
of tests/servers for what a healthy real server will not do on request (429, 500, 401, garbage,
silence, a cut stream)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import httpx
import pytest

from tests.servers import scripted
from tests.servers.scripted import ScriptedServer, Step, drop, slow, status, text, tool_call
from tongyi_local.backends.openai import OpenAIGenerator
from tongyi_local.backends.retry import RetryPolicy
from tongyi_local.errors import (AuthenticationError, ConfigError, RateLimitError,
                                 RemoteConnectionError, RemoteRequestError, RemoteTimeoutError,
                                 ResponseFormatError, ServerError, TongyiError)
from tongyi_local.types import Generator

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, max_total_s=5.0)
KEY = "sk-local-9f8e7d6c5b4a3"
PROMPT = "PRIVATE-PROMPT-walrus-plans"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
FORCE_WEATHER = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}


@pytest.fixture(scope="module")
def llama_server(starter_path, tmp_path_factory):
    """``python -m llama_cpp.server`` on a free loopback port; chatml-function-calling makes it
    parse tool calls. Waits at most 120 s for it to answer."""
    port = scripted.free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(starter_path),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1",
             "--chat_format", "chatml-function-calling"],
            stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        else:
            pytest.fail(f"llama_cpp.server did not answer in 120 s: {log_path.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def real(llama_server):
    g = OpenAIGenerator("starter", base_url=llama_server, retry=FAST)
    yield g
    g.close()


@pytest.fixture
def server():
    srv = ScriptedServer("openai", api_key=KEY)
    yield srv
    srv.close()


@pytest.fixture
def gen(server):
    g = OpenAIGenerator("test-model", base_url=server.url, api_key=KEY, retry=FAST)
    yield g
    g.close()


# --- the real server ------------------------------------------------------------------------
@pytest.mark.slow
def test_real_server_completion_matches_the_in_process_backend(real, starter):
    """Same GGUF, same llama.cpp, greedy: the server's text equals the local backend's."""
    assert isinstance(real, Generator) and real.remote is True and real.health() is True
    remote = real.complete("The capital of France is", max_tokens=8, temperature=0)
    local = starter.complete("The capital of France is", max_tokens=8, temperature=0)
    assert remote.text == local.text and remote.text.strip()
    assert remote.finish_reason == "length" and remote.usage.completion_tokens == 8
    assert 0 < remote.timings.ttft_ms <= remote.timings.total_ms


@pytest.mark.slow
def test_real_server_chat_and_stream(real):
    messages = [{"role": "user", "content": "Name a colour."}]
    chunks = list(real.stream(messages, max_tokens=6, temperature=0))
    final = chunks[-1].completion
    assert final is not None and len(chunks) > 2
    assert "".join(c.text for c in chunks) == final.text and final.text
    assert final.usage.completion_tokens <= 6 and final.timings.decode_tokens >= 1
    assert real.chat(messages, max_tokens=6, temperature=0).text == final.text


@pytest.mark.slow
def test_real_server_tool_calls_are_parsed(llama_server):
    with OpenAIGenerator("starter", base_url=llama_server, extra_body=FORCE_WEATHER) as g:
        c = g.chat([{"role": "user", "content": "What is the weather in Paris?"}],
                   tools=[WEATHER], max_tokens=40, temperature=0)
        streamed = list(g.stream([{"role": "user", "content": "What is the weather in Paris?"}],
                                 tools=[WEATHER], max_tokens=40, temperature=0))[-1].completion
    assert c.finish_reason == "tool_calls" and len(c.tool_calls) == 1
    (call,) = c.tool_calls
    assert call.name == "get_weather" and call.id and "city" in call.arguments
    assert streamed.tool_calls[0].name == "get_weather"
    assert streamed.tool_calls[0].arguments == call.arguments


def test_connection_refused_is_a_clear_error():
    port = scripted.free_port()
    g = OpenAIGenerator("m", base_url=f"http://127.0.0.1:{port}/v1",
                        retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
    with pytest.raises(RemoteConnectionError, match="is the server running") as info:
        g.complete("hi")
    assert info.value.attempts == 2 and "Traceback" not in str(info.value)
    assert g.health() is False


# --- the scripted server --------------------------------------------------------------------
def test_request_on_the_wire(gen, server):
    c = gen.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=5, stop=["X"],
                 seed=1, tools=[WEATHER])
    assert c.text == "Hello world" and (c.usage.prompt_tokens, c.usage.completion_tokens) == (7, 2)
    (req,) = server.generation_requests()
    assert req.path == "/v1/chat/completions" and req.headers["Authorization"] == f"Bearer {KEY}"
    body = req.body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_tokens"], body["stop"], body["seed"]) == (0, 5, ["X"], 1)
    assert body["tools"] == [WEATHER] and body["top_k"] == 40
    gen.complete("raw text")
    assert server.generation_requests()[1].path == "/v1/completions"
    assert server.generation_requests()[1].body["prompt"] == "raw text"


def test_sampling_extras_can_be_turned_off_and_extra_body_merges(server):
    with OpenAIGenerator("m", base_url=server.url, api_key=KEY, sampling_extras=False,
                         extra_body={"tool_choice": "required"}, sampling={"max_tokens": 9}) as g:
        g.chat([{"role": "user", "content": "hi"}])
    body = server.generation_requests()[0].body
    assert "top_k" not in body and body["tool_choice"] == "required" and body["max_tokens"] == 9


def test_scripted_tool_call_deltas_are_joined(gen, server):
    server.script(tool_call("lookup", '{"q"', ': "x"', "}"))
    c = gen.chat([{"role": "user", "content": "find x"}], tools=[WEATHER])
    assert c.finish_reason == "tool_calls" and c.tool_calls[0].name == "lookup"
    assert c.tool_calls[0].arguments == {"q": "x"}


def test_429_and_500_are_retried_then_exhausted(gen, server):
    server.script(status(429, message="slow down", retry_after="0"), text("ok"))
    assert gen.complete("hi").text == "ok"
    server.script(*[status(500, message="boom")] * 3)
    with pytest.raises(ServerError, match="gave up after 3 attempts"):
        gen.complete("hi")
    assert len(server.generation_requests()) == 2 + 3
    server.default = status(429, message="slow down")
    with pytest.raises(RateLimitError):
        gen.complete("hi")


def test_auth_failure_is_not_retried_and_named_env_key_is_required(server, monkeypatch):
    monkeypatch.setenv("MY_SERVER_KEY", "sk-wrong-000000000")
    g = OpenAIGenerator("m", base_url=server.url, api_key_env="MY_SERVER_KEY", retry=FAST)
    with pytest.raises(AuthenticationError, match=r"check \$MY_SERVER_KEY") as info:
        g.complete("hi")
    assert len(server.generation_requests()) == 1 and "sk-wrong" not in str(info.value)
    monkeypatch.delenv("MY_SERVER_KEY")
    with pytest.raises(AuthenticationError, match="set MY_SERVER_KEY"):
        g.stream("hi")
    assert len(server.generation_requests()) == 1


@pytest.mark.parametrize("step, error, fragment", [
    (Step("malformed_stream"), ResponseFormatError, "not the OpenAI protocol"),
    (Step("malformed_json"), ResponseFormatError, "not the OpenAI protocol"),
    (status(404, message="no route"), RemoteRequestError, "usually ending in /v1"),
], ids=["bad-sse", "bad-json", "404"])
def test_malformed_or_rejected_answers_are_clear_errors(gen, server, step, error, fragment):
    server.script(step)
    with pytest.raises(error, match=fragment):
        gen.complete("hi")
    assert len(server.generation_requests()) == 1


def test_errors_after_text_surface_without_a_retry(gen, server):
    for step, error in ((drop("Hel", "lo"), RemoteConnectionError), (Step("stream_error"), ServerError)):
        server.script(step)
        seen = []
        with pytest.raises(error):
            for chunk in gen.stream("hi"):
                seen.append(chunk.text)
        assert seen and seen[0] == "Hel"
    assert len(server.generation_requests()) == 2


def test_slow_server_hits_the_timeout(server):
    server.script(slow(5), slow(5))
    g = OpenAIGenerator("m", base_url=server.url, api_key=KEY, timeout_s=0.3,
                        retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="within 0.3 s"):
        g.complete("hi")
    assert time.monotonic() - start < 3 and len(server.generation_requests()) == 2


def test_key_and_prompt_stay_out_of_logs_errors_and_repr(server, caplog):
    caplog.set_level(logging.DEBUG)
    g = OpenAIGenerator("m", base_url=server.url, api_key=KEY, retry=FAST, timeout_s=0.3)
    server.script(text("fine"), status(500), status(500), status(500), slow(3), slow(3), slow(3))
    errors = []
    for _ in range(3):
        try:
            g.chat([{"role": "user", "content": PROMPT}])
        except TongyiError as e:
            errors.append(e)
    assert [type(e) for e in errors] == [ServerError, RemoteTimeoutError]
    shown = caplog.text + "".join(f"{e}{e!r}" for e in errors) + repr(g) + str(vars(g))
    assert KEY not in shown and PROMPT not in shown


def test_bad_construction_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIGenerator("m", base_url="localhost:8080")
    with pytest.raises(ConfigError, match="model"):
        OpenAIGenerator("", base_url="http://127.0.0.1:1/v1")
