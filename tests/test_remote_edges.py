"""The remote backends map only what the server and the transport do wrong; a bug in our own
parsing propagates as itself instead of becoming advice about base_url."""

from __future__ import annotations

import pytest

from tests.servers.scripted import ScriptedServer, Step, text
from tongyi_local.backends import dashscope as ds
from tongyi_local.backends import openai as oa
from tongyi_local.backends.retry import RetryPolicy
from tongyi_local.errors import ResponseFormatError

FAST = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, max_total_s=2.0, seed=0)
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture
def openai_server():
    server = ScriptedServer("openai")
    yield server
    server.close()


@pytest.fixture
def dashscope_server():
    server = ScriptedServer("dashscope", api_key="sk-edge-test-123456")
    yield server
    server.close()


def test_an_answer_of_the_wrong_shape_is_a_response_format_error(openai_server):
    openai_server.script(Step("wrong_shape"))
    with oa.OpenAIGenerator("m", base_url=openai_server.url, retry=FAST) as gen:
        with pytest.raises(ResponseFormatError, match="not the OpenAI protocol"):
            gen.chat(ASK)


def test_a_bug_in_our_openai_parser_propagates_as_itself(openai_server, monkeypatch):
    def broken(self, event, whole=False):
        raise KeyError("our bug")

    monkeypatch.setattr(oa._StreamState, "take", broken)
    openai_server.script(text("Hello"))
    with oa.OpenAIGenerator("m", base_url=openai_server.url, retry=FAST) as gen:
        with pytest.raises(KeyError, match="our bug"):
            gen.chat(ASK)


def test_a_bug_in_our_dashscope_parser_propagates_as_itself(dashscope_server, monkeypatch):
    def broken(self, rsp):
        raise AttributeError("our bug")

    monkeypatch.setattr(ds._Answer, "take", broken)
    dashscope_server.script(text("Hello"))
    gen = ds.DashScopeGenerator("qwen-test", api_key="sk-edge-test-123456",
                                base_url=dashscope_server.url, retry=FAST)
    with pytest.raises(AttributeError, match="our bug"):
        gen.chat(ASK)
