"""FallbackGenerator and the privacy rule, with real parts: the real local backend failing to load
a bad GGUF, the real DashScope SDK talking to the scripted DashScope server on 127.0.0.1. The
FakeGenerator stands in only where a second backend's own behaviour does not matter."""

from __future__ import annotations

import logging

import pytest

from tests.servers import scripted
from tests.servers.scripted import ScriptedServer, drop, slow, status
from tongyi_local.backends.dashscope import DashScopeGenerator
from tongyi_local.backends.fake import FakeGenerator
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.backends.openai import OpenAIGenerator
from tongyi_local.backends.retry import RetryPolicy
from tongyi_local.errors import (AuthenticationError, ConfigError, InvalidRequestError,
                                 ModelLoadError, PrivacyError, RemoteConnectionError)
from tongyi_local.fallback import FallbackGenerator, enforce_privacy
from tongyi_local.types import Generator

KEY = "sk-test-fallback-0123456789"
PROMPT = "PRIVATE-PROMPT-secret-merger-notes"


@pytest.fixture
def server():
    srv = ScriptedServer("dashscope", api_key=KEY)
    yield srv
    srv.close()


@pytest.fixture
def cloud(server):
    return DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url, timeout_s=0.5,
                              retry=RetryPolicy.none())


@pytest.fixture
def bad_local(tmp_path):
    """A factory loading a corrupt GGUF through the real local backend; counts its calls."""
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf at all" * 64)
    calls = []

    def load_local():
        calls.append(1)
        return LlamaGenerator(path)

    load_local.calls = calls
    return load_local


def fallback_records(caplog):
    return [r for r in caplog.records if hasattr(r, "fallback")]


def test_local_load_failure_falls_back_to_the_cloud(bad_local, cloud, server, caplog):
    caplog.set_level(logging.DEBUG)
    router = FallbackGenerator(bad_local, cloud, role="researcher")
    assert isinstance(router, Generator)
    first = router.chat([{"role": "user", "content": PROMPT}])
    assert first.text == "Hello world" and first.model == "dashscope:qwen-test"
    assert router.complete(PROMPT).text == "Hello world"
    assert len(bad_local.calls) == 1  # the failed load is remembered, not retried per request
    (decision, _) = router.decisions
    assert (decision.action, decision.role, decision.source, decision.target, decision.reason) == (
        "fallback", "researcher", "load_local", "dashscope:qwen-test", "ModelLoadError")
    record = fallback_records(caplog)[0].fallback
    assert set(record) == {"action", "role", "from", "to", "reason", "latency_ms"}
    assert record["latency_ms"] >= 0
    assert PROMPT not in caplog.text and "Hello world" not in caplog.text
    assert len(server.generation_requests()) == 2


@pytest.mark.parametrize("failure", [status(503, "ServiceUnavailable", "overloaded"),
                                     status(429, "Throttling", "quota"), slow(5)],
                         ids=["overloaded", "rate-limited", "timeout"])
def test_cloud_overload_or_timeout_falls_back_before_any_text(cloud, server, failure):
    server.script(failure)
    backup = FakeGenerator(["local answer"], name="local")
    router = FallbackGenerator(cloud, backup, role="coder")
    chunks = list(router.stream([{"role": "user", "content": "hi"}]))
    assert chunks[-1].completion.text == "local answer" and len(backup.calls) == 1
    assert router.decisions[0].reason.split("(")[0] in ("ServerError", "RateLimitError",
                                                        "RemoteTimeoutError")


def test_unreachable_cloud_falls_back_to_the_real_local_model(starter):
    port = scripted.free_port()
    offline = DashScopeGenerator("qwen-test", api_key=KEY, base_url=f"http://127.0.0.1:{port}/api/v1",
                                 retry=RetryPolicy.none())
    router = FallbackGenerator(offline, starter, role="tester")
    c = router.complete("The capital of France is", max_tokens=4, temperature=0)
    assert c.text and c.model == starter.name
    assert router.decisions[0].reason == "RemoteConnectionError"


def test_local_only_never_reaches_the_cloud(bad_local, cloud, server, caplog):
    caplog.set_level(logging.INFO)
    router = FallbackGenerator(bad_local, cloud, role="coder", privacy="local-only")
    assert router.remote is False
    with pytest.raises(PrivacyError, match="local-only") as info:
        router.chat([{"role": "user", "content": PROMPT}])
    assert isinstance(info.value.__cause__, ModelLoadError)
    assert server.requests == [] and router.decisions[0].action == "blocked"
    assert PROMPT not in caplog.text and PROMPT not in str(info.value)


def test_enforce_privacy(cloud, server, bad_local):
    local = FakeGenerator(default="x", name="local")
    assert enforce_privacy(local, "local-only", "coder") is local
    assert enforce_privacy(cloud, None, "coder") is cloud and enforce_privacy(cloud, "any") is cloud
    with pytest.raises(PrivacyError, match="role 'coder' is local-only, but dashscope:qwen-test"):
        enforce_privacy(cloud, "local-only", "coder")
    trusted = OpenAIGenerator("m", base_url="http://127.0.0.1:1/v1", remote=False)
    assert enforce_privacy(trusted, "local-only", "coder") is trusted

    class Unknown:  # no ``remote`` attribute: treated as remote (fail closed)
        name = "mystery"

    with pytest.raises(PrivacyError, match="mystery"):
        enforce_privacy(Unknown(), "local-only", "coder")
    with pytest.raises(ConfigError, match="privacy must be one of"):
        enforce_privacy(local, "cloud-please", "coder")
    router = enforce_privacy(FallbackGenerator(bad_local, cloud), "local-only", "coder")
    with pytest.raises(PrivacyError):
        router.complete("hi")
    with pytest.raises(PrivacyError):
        FallbackGenerator(cloud, local, privacy="local-only")
    assert server.requests == []


def test_a_stream_that_yielded_text_surfaces_the_error(cloud, server):
    server.script(drop("Hel", "lo"))
    backup = FakeGenerator(default="never used")
    router = FallbackGenerator(cloud, backup, role="reviewer")
    seen = []
    with pytest.raises(RemoteConnectionError):
        for chunk in router.stream([{"role": "user", "content": PROMPT}]):
            seen.append(chunk.text)
    assert seen == ["Hel", "lo"] and backup.calls == []
    assert router.decisions[0].action == "surfaced" and router.decisions[0].target is None


def test_auth_and_invalid_request_errors_do_not_fall_back(server):
    backup = FakeGenerator(default="x")
    wrong = DashScopeGenerator("qwen-test", api_key="sk-wrong-999999", base_url=server.url)
    with pytest.raises(AuthenticationError):
        FallbackGenerator(wrong, backup).complete("hi")
    with pytest.raises(InvalidRequestError):
        FallbackGenerator(FakeGenerator(default="x"), backup).complete("hi", temperature=-1)
    assert backup.calls == []


def test_a_healthy_primary_never_builds_the_secondary(server, cloud):
    built = []
    router = FallbackGenerator(cloud, lambda: built.append(1) or FakeGenerator(default="x"))
    assert router.complete("hi").text == "Hello world" and built == [] and not router.decisions
    assert router.health() is True
    server.close()  # the cloud goes away
    assert cloud.health() is False and router.health() is True and built == [1]
    router.close()
    with pytest.raises(Exception, match="closed"):
        router.complete("hi")


def test_bad_arguments():
    with pytest.raises(ConfigError, match="generator or a zero-argument factory"):
        FallbackGenerator("not a generator", FakeGenerator())
    with pytest.raises(ConfigError, match="privacy"):
        FallbackGenerator(FakeGenerator(), FakeGenerator(), privacy="secret")
