"""The runnable examples, as a user runs them: a real subprocess on the packaged chat model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_agents_loop_runs_three_roles_and_a_tool(chat_model_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "agents_loop.py"),
                           "Write a Python function that adds two numbers."],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("coordinator> ") for line in lines)
    assert any(line.startswith("coder> ") for line in lines)
    assert any(line.startswith("tester> calls check_python(code=<") for line in lines)
    assert any(line.startswith("tool> ") and ("parses" in line or "syntax error" in line)
               for line in lines)
