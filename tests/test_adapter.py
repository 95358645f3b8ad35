"""The drop-in ITextGenerator adapter, the provider factory, and sampling options that are "not
set" keeping a role's defaults (through the real CLI in a subprocess, against a real HTTP
server on 127.0.0.1 that records what it was sent)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

import tongyi_local
from tests.servers.scripted import ScriptedServer, text, tool_call
from tongyi_local.adapter import TextGeneratorAdapter, create_provider, format_tool_calls
from tongyi_local.errors import AuthenticationError, ConfigError, InvalidRequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture
def server():
    srv = ScriptedServer("openai")
    yield srv
    srv.close()


def _toml(tmp_path, server_url: str, chat_model_path=None) -> str:
    local = f"""
[models.chat]
source = "path"
path = "{chat_model_path}"
context_length = 1024

[roles.tester]
model = "chat"
system_prompt = "You write tests."
""" if chat_model_path else ""
    path = tmp_path / "models.toml"
    path.write_text(f"""
[models.remote-coder]
backend = "openai"
model_id = "coder-model"
base_url = "{server_url}"
sampling = {{ temperature = 0.7, top_p = 0.5, max_tokens = 64 }}

[roles.coder]
model = "remote-coder"
sampling = {{ temperature = 0.2, top_p = 0.9 }}
{local}""")
    return str(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tongyi_local", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})


def test_generate_role_keeps_the_roles_sampling_unless_an_option_is_given(tmp_path, server):
    config = _toml(tmp_path, server.url)
    done = _cli("generate", "--role", "coder", "--config", config, "hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hello world"
    body = server.generation_requests()[-1].body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.9, 64)
    done = _cli("generate", "--role", "coder", "--config", config, "-t", "0.5", "-n", "9", "hi")
    assert done.returncode == 0, done.stderr
    body = server.generation_requests()[-1].body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.5, 0.9, 9)


def test_mock_provider_answers_from_its_script():
    provider = create_provider("mock", replies=["first answer"], default="later")

    async def use():
        return (await provider.generate("q"), await provider.generate("q"),
                await provider.health_check())

    assert asyncio.run(use()) == ("first answer", "later", True)


def test_tongyi_provider_needs_the_key_at_creation(monkeypatch):
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="DASHSCOPE_API_KEY"):
        create_provider("tongyi")
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test-123456789")
    assert create_provider("tongyi").generator().name == "dashscope:qwen-plus"


def test_unknown_provider_and_options_are_named():
    with pytest.raises(ConfigError, match="tongyi-local"):
        create_provider("openai-magic")
    with pytest.raises(InvalidRequestError, match="temprature"):
        asyncio.run(create_provider("mock").generate("q", temprature=0.1))


def test_tongyi_local_provider_uses_llama_cpp_url_when_set(monkeypatch, server):
    monkeypatch.setenv("LLAMA_CPP_URL", server.url.removesuffix("/v1"))
    server.script(text("It", " works"), tool_call("get_weather", '{"city": ', '"Oslo"}'))
    provider = create_provider("tongyi-local")

    async def use():
        answer = await provider.generate("hello", max_tokens=5, temperature=0.1, stop=["x"])
        tools = await provider.generate_with_tools("weather in Oslo?", [WEATHER])
        healthy = await provider.health_check()
        await provider.close()
        return answer, tools, healthy

    answer, tools, healthy = asyncio.run(use())
    assert answer == "It works" and healthy
    assert tools == 'TOOL_CALL: get_weather({"city": "Oslo"})'
    body = server.generation_requests()[0].body
    assert (body["max_tokens"], body["temperature"], body["stop"]) == (5, 0.1, ["x"])


def test_tongyi_local_provider_runs_roles_in_process(monkeypatch, tmp_path, server,
                                                     chat_model_path):
    monkeypatch.delenv("LLAMA_CPP_URL", raising=False)
    provider = create_provider("tongyi-local", role="tester",
                               config_path=_toml(tmp_path, server.url, chat_model_path))

    async def use():
        answer = await provider.generate("What is the capital of France?", max_tokens=16,
                                         temperature=0)
        typed = await provider.complete_with_tools("What is the weather in Paris?", [WEATHER],
                                                   tool_choice="required", max_tokens=60,
                                                   temperature=0)
        remote = await provider.generate("hi", role="coder")
        await provider.close()
        return answer, typed, remote

    answer, typed, remote = asyncio.run(use())
    assert "Paris" in answer
    assert typed.tool_calls[0].name == "get_weather"
    assert format_tool_calls(typed).startswith("TOOL_CALL: get_weather({\"city\": ")
    assert remote == "Hello world"  # role= picked the coder role's (remote) model


def test_adapter_over_any_generator():
    fake = tongyi_local.FakeGenerator(default="ok")
    adapter = TextGeneratorAdapter(fake)
    assert asyncio.run(adapter.generate("q", max_tokens=3)) == "ok"
    assert fake.calls[0].sampling.max_tokens == 3 and fake.calls[0].sampling.temperature == 0.7
