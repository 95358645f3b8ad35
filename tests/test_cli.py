"""The CLI through real subprocesses, on the real starter model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "tongyi_local"]


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "80"})


def test_generate_streams_text(starter_path):
    done = run("generate", "The capital of France is", "-n", "12", "-t", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "llama_model_loader" not in done.stderr  # llama.cpp's log goes to logging, not stderr


def test_generate_json_has_text_usage_and_timings(starter_path):
    done = run("generate", "Once upon a time", "-n", "8", "-t", "0", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["usage"]["completion_tokens"] <= 8
    assert result["finish_reason"] in ("stop", "length")
    assert result["timings"]["ttft_ms"] > 0 and result["timings"]["load_ms"] > 0
    again = json.loads(run("generate", "Once upon a time", "-n", "8", "-t", "0", "--json").stdout)
    assert again["text"] == result["text"]


def test_generate_reads_prompt_from_stdin_and_chats(starter_path):
    done = run("generate", "-", "--chat", "-n", "4", "-t", "0", "--json", stdin="Say hi.")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["prompt_tokens"] > 5


@pytest.mark.parametrize("args, fragment", [
    (["generate", "hi", "--model", "/no/such/model.gguf"], "model file not found: /no/such/model.gguf"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
])
def test_bad_input_is_one_line_and_exit_1(args, fragment):
    done = run(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_not_a_gguf_and_prompt_too_long(tmp_path, starter_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"\x00" * 1024)
    done = run("generate", "hi", "--model", str(bogus))
    assert done.returncode == 1 and "not a GGUF file" in done.stderr and str(bogus) in done.stderr
    long = run("generate", "-", "--ctx", "256", stdin="word " * 400)
    assert long.returncode == 1 and "Traceback" not in long.stderr
    assert "context holds 256" in long.stderr


def test_chat_repl_keeps_the_conversation(starter_path):
    done = run("chat", "-n", "6", "-t", "0", "--verbose",
               stdin="Hello there.\nAnd again.\n/exit\n")
    assert done.returncode == 0, done.stderr
    prompts = [line for line in done.stderr.splitlines() if "prompt" in line and "tok" in line]
    assert len(prompts) == 2
    first, second = (int(p.split("prompt ")[1].split(" tok")[0]) for p in prompts)
    assert second > first  # the second turn carries the first one


def test_doctor_reports_the_build_and_its_simd():
    done = run("doctor", "--json")
    report = json.loads(done.stdout)
    assert report["physical_cores"] >= 1 and report["threads"] >= 1
    assert "AVX2 = 1" in report["system_info"] or "AVX2" not in report["simd"]
    # exit code follows the SIMD check: non-zero exactly when the build lacks a CPU feature
    assert done.returncode == (1 if report["missing_simd"] else 0)


def test_doctor_fails_when_the_build_lacks_cpu_simd(monkeypatch, capsys):
    # A CPU with AVX-512 against a build without it cannot be produced on one machine, so the
    # build's report is substituted here; everything else is the real doctor command.
    from tongyi_local import cli
    from tongyi_local.backends import runtime

    monkeypatch.setattr(runtime, "system_info", lambda: "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | "
                        "F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 0 |")
    monkeypatch.setattr(cli.hardware, "read_topology", lambda: cli.hardware.Topology(
        cpus=(cli.hardware.LogicalCPU(0, 0, 0),),
        flags=frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"})))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor"])
    assert exit_info.value.code == 1
    assert "AVX512" in capsys.readouterr().err


def test_module_entry_point_and_help():
    done = run("--help")
    assert done.returncode == 0 and "generate" in done.stdout and "doctor" in done.stdout


def test_generate_on_the_dashscope_backend_through_the_real_sdk(tmp_path):
    from servers.scripted import ScriptedServer

    key = "sk-cli-test-key-never-printed"
    server = ScriptedServer("dashscope", api_key=key)
    try:
        env = {**os.environ, "COLUMNS": "80", "DASHSCOPE_API_KEY": key}
        args = [*CLI, "generate", "Hello", "--backend", "dashscope", "--base-url", server.url,
                "--remote-model", "qwen-plus", "--json"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["text"] == "Hello world"
        assert key not in done.stdout + done.stderr
        env.pop("DASHSCOPE_API_KEY")
        missing = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert missing.returncode == 1 and "DASHSCOPE_API_KEY" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        server.close()
