"""The llm plugin through simonw's real ``llm`` CLI in subprocesses: the plugin is found by its
entry point, roles answer on the real packaged chat model, usage lands in llm's own log, and
errors come back as llm errors. A scripted (fake backend) model from the same models.toml covers
the paths that need no real answer: history, async, no streaming, backend errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llm", reason="the llm CLI is not installed (pip install -e .[llm])")

LLM = [sys.executable, "-m", "llm"]
QUESTION = "Which city is the capital of France?"  # the chat model answers it greedily: "Paris"
SYSTEM = "Answer in one short sentence."
SCRIPT = ["Paris is the capital.", "Berlin is."]  # what the fake model answers, in order
FAILURE = "scripted failure for the llm plugin test"


@pytest.fixture
def llm_env(tmp_path, chat_model_path) -> dict[str, str]:
    """A models.toml of our own (role coder on the chat model, greedy; a scripted model; a
    failing one) and a private llm user directory, so llm's log database is this test's."""
    config = tmp_path / "models.toml"
    config.write_text(f"""
[models.chat]
source = "path"
path = {json.dumps(str(chat_model_path))}
context_length = 2048

[roles.coder]
model = "chat"
sampling = {{ temperature = 0 }}

[models.scripted]
backend = "fake"
replies = {json.dumps(SCRIPT)}

[models.failing]
backend = "fake"
replies = [{{ error = "BackendError", message = "{FAILURE}" }},
           {{ error = "BackendError", message = "{FAILURE}" }},
           {{ error = "BackendError", message = "{FAILURE}" }}]
""")
    env = {k: v for k, v in os.environ.items() if k != "LLM_LOAD_PLUGINS"}
    env.update(TONGYI_LOCAL_CONFIG=str(config), LLM_USER_PATH=str(tmp_path / "llm-user"))
    return env


def llm(env: dict[str, str], *args: str, stdin: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LLM, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def logged(env: dict[str, str], count: int) -> list[dict]:
    """The last ``count`` responses in llm's log, oldest first: ``llm logs --json`` run by
    click's test runner in this process (llm's own command on the same log database, without
    another interpreter start per check)."""
    from click.testing import CliRunner
    from llm.cli import cli

    done = CliRunner().invoke(cli, ["logs", "--json", "-n", str(count)],
                              env={"LLM_USER_PATH": env["LLM_USER_PATH"]})
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def usage_rows(env: dict[str, str], count: int) -> list[tuple[int, int, str]]:
    """(input tokens, output tokens, conversation id) of the last ``count`` responses."""
    return [(e["input_tokens"], e["output_tokens"], e["conversation_id"])
            for e in logged(env, count)]


def words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


def test_models_list_shows_the_roles_and_models(llm_env):
    done = llm(llm_env, "models", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "tongyi-local role: tongyi-local/coder" in lines, (
        "llm lists no tongyi-local models: the package's llm entry point is not installed "
        "(pip install -e .[llm])")
    assert "tongyi-local model: tongyi-local/chat" in lines
    assert "tongyi-local model: tongyi-local/scripted" in lines


def test_listing_models_loads_no_model(llm_env):
    code = ("import sys, llm; ids = [m.model_id for m in llm.get_models()]; "
            "assert 'tongyi-local/coder' in ids, ids; "
            "print(sorted(m for m in sys.modules if m.startswith(('llama_cpp', "
            "'tongyi_local.backends.llama'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=llm_env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_role_answers_a_prompt_and_llm_logs_its_usage(llm_env):
    done = llm(llm_env, "-m", "tongyi-local/coder", QUESTION, "-o", "max_tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    [entry] = logged(llm_env, 1)
    assert entry["model"] == "tongyi-local/coder"
    assert entry["resolved_model"] == "chat"
    assert entry["options_json"] == {"max_tokens": 16}
    assert "Paris" in entry["response"]
    assert entry["input_tokens"] > 0
    assert 0 < entry["output_tokens"] <= 16


@pytest.mark.slow
def test_llm_chat_answers_on_a_role(llm_env):
    done = llm(llm_env, "chat", "-m", "tongyi-local/coder", "-o", "max_tokens", "16",
               stdin=f"{QUESTION}\nquit\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    [entry] = logged(llm_env, 1)
    assert entry["model"] == "tongyi-local/coder" and entry["output_tokens"] > 0


def test_llm_chat_sends_the_system_prompt_and_the_history(llm_env):
    # The scripted model counts a request's input tokens as the words of all its messages.
    second = "And Germany?"
    done = llm(llm_env, "chat", "-m", "tongyi-local/scripted", "-s", SYSTEM,
               stdin=f"{QUESTION}\n{second}\nquit\n")
    assert done.returncode == 0, done.stderr
    assert SCRIPT[0] in done.stdout and SCRIPT[1] in done.stdout
    first_turn, second_turn = usage_rows(llm_env, 2)
    assert first_turn[:2] == (words(SYSTEM, QUESTION), 4)
    assert second_turn[:2] == (words(SYSTEM, QUESTION, SCRIPT[0], second), 2)
    assert first_turn[2] == second_turn[2]  # one conversation


@pytest.mark.parametrize("mode", [["--async"], ["--async", "--no-stream"], ["--no-stream"]],
                         ids=["async-stream", "async", "sync"])
def test_async_and_unstreamed_prompts_answer_with_their_options(llm_env, mode):
    done = llm(llm_env, *mode, "-m", "tongyi-local/scripted", QUESTION, "-o", "max_tokens", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Paris is"  # the script's first two words: max_tokens applied
    [(prompt_tokens, completion_tokens, _)] = usage_rows(llm_env, 1)
    assert (prompt_tokens, completion_tokens) == (len(QUESTION.split()), 2)


BAD_OPTIONS = {  # option: (value, what the error says)
    "temperature": ("-1", "temperature must be >= 0 (got -1.0); 0 is greedy"),
    "top_p": ("1.5", "top_p must be in (0, 1] (got 1.5)"),
    "max_tokens": ("0", "max_tokens must be an integer >= 1 (got 0)"),
    "seed": ("-3", "seed must be an integer >= 0 (got -3)"),
    "stop": ("", "stop must be non-empty strings"),
    "top_k": ("many", "valid integer"),
    "typical_p": ("0.5", "Extra inputs are not permitted"),
}


def test_bad_options_are_clear_llm_errors(llm_env):
    options = [arg for name, (value, _) in BAD_OPTIONS.items() for arg in ("-o", name, value)]
    done = llm(llm_env, "-m", "tongyi-local/coder", "hi", *options)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    for name, (_, says) in BAD_OPTIONS.items():  # each option named, its problem below it
        at = next(i for i, line in enumerate(lines) if line.removeprefix("Error: ") == name)
        assert says in lines[at + 1], done.stderr
    assert "Traceback" not in done.stderr and not done.stdout.strip()
    assert logged(llm_env, 1) == []  # nothing was asked


def test_a_backend_error_is_an_llm_error_with_our_message(llm_env):
    done = llm(llm_env, "-m", "tongyi-local/failing", "hi")
    assert done.returncode != 0
    assert f"Error: {FAILURE}" in done.stderr
    assert "Traceback" not in done.stderr


def test_python_api_raises_llm_model_error(llm_env):
    """llm's Python API, sync and async: our error arrives as ``llm.ModelError``."""
    code = """if True:
        import asyncio, llm
        def caught(run):
            try:
                run()
            except llm.ModelError as exc:
                return str(exc)
            return "no error"
        print(caught(lambda: llm.get_model("tongyi-local/failing").prompt("hi").text()))
        model = llm.get_async_model("tongyi-local/failing")
        print(caught(lambda: asyncio.run(model.prompt("hi").text())))
        print(caught(lambda: asyncio.run(model.prompt("hi", stream=False).text())))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=llm_env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [FAILURE] * 3


def test_a_bad_models_toml_leaves_llm_working_and_says_why(llm_env, tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[roles.coder\n")
    env = {**llm_env, "TONGYI_LOCAL_CONFIG": str(broken)}
    done = llm(env, "models", "list")
    assert done.returncode == 0, done.stderr
    assert "tongyi-local/" not in done.stdout
    assert done.stdout.strip()  # llm's own models are still there
    assert "no models registered with llm" in done.stderr and "not valid TOML" in done.stderr
    assert done.stderr.count("no models registered") == 1
    assert "Traceback" not in done.stderr
