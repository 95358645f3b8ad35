"""No prompt, no answer and never an API key in any log record of a full run: local model,
role through the pool, fallback, DashScope over real HTTP, the CLI at -v; and the explicit
opt-in that does log content says so."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import tongyi_local
from tests.servers.scripted import ScriptedServer, text
from tongyi_local.backends.dashscope import DashScopeGenerator
from tongyi_local.backends.fake import FakeGenerator
from tongyi_local.errors import RemoteConnectionError
from tongyi_local.fallback import FallbackGenerator

PROMPT = "PRIVATE-walrus-migration-plan-7731"
KEY = "sk-privacy-test-0a1b2c3d4e5f"


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured():
    handler = _Everything()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def _answers_of(*completions) -> list[str]:
    return [c.text.strip() for c in completions if len(c.text.strip()) >= 12]


def test_a_full_run_logs_no_prompt_answer_or_key(captured, tmp_path, chat_model_path,
                                                monkeypatch):
    monkeypatch.delenv("TONGYI_LOCAL_LOG_CONTENT", raising=False)
    ask = [{"role": "user", "content": f"Summarise: {PROMPT}"}]
    server = ScriptedServer("dashscope", api_key=KEY)
    server.script(text("Remote answer about", " the walrus plan"))
    config = tmp_path / "models.toml"
    config.write_text(f"""
[models.chat]
source = "path"
path = "{chat_model_path}"
context_length = 512

[models.cloud]
backend = "dashscope"
model_id = "qwen-test"
base_url = "{server.url}"
api_key_env = "PRIVACY_TEST_KEY"

[roles.coder]
model = "chat"
fallback = "cloud"
system_prompt = "You write Python. {PROMPT}"
""")
    monkeypatch.setenv("PRIVACY_TEST_KEY", KEY)
    try:
        results = []
        with tongyi_local.load(chat_model_path, n_ctx=512) as local:
            results.append(local.chat(ask, max_tokens=24, temperature=0))
            role = tongyi_local.Registry(config_path=config).for_role("coder")
            results.append(role.chat(ask, max_tokens=24, temperature=0))
            cloud = DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url)
            results.append(cloud.chat(ask))
            fallback = FallbackGenerator(FakeGenerator(default=RemoteConnectionError("down")),
                                         local, role="coder")
            results.append(fallback.chat(ask, max_tokens=24, temperature=0))
        cli = subprocess.run([sys.executable, "-m", "tongyi_local", "generate", "--chat", "-v",
                              "-n", "16", "-t", "0", f"Summarise: {PROMPT}"],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "COLUMNS": "80"})
    finally:
        server.close()
    assert cli.returncode == 0, cli.stderr
    logs = "\n".join(captured.lines)
    assert len(captured.lines) > 20  # the run did log: llama.cpp, pool, fallback, SDK
    assert "fallback" in logs and "tongyi_local.llama" in logs
    for secret in [PROMPT, KEY, *_answers_of(*results)]:
        assert secret not in logs
        assert secret not in cli.stderr
    assert "Remote answer about the walrus plan" in {r.text for r in results}


def test_content_logging_is_an_explicit_opt_in_that_says_so(captured, monkeypatch, tiny_qwen2):
    monkeypatch.setenv("TONGYI_LOCAL_LOG_CONTENT", "1")
    monkeypatch.setattr("tongyi_local.backends.base._content_announced", False)
    with tongyi_local.load(tiny_qwen2, n_ctx=256) as model:
        done = model.complete(PROMPT, max_tokens=4, temperature=0)
    logs = "\n".join(captured.lines)
    assert "TONGYI_LOCAL_LOG_CONTENT is set: prompt and output text are logged" in logs
    assert PROMPT in logs and repr(done.text) in logs
