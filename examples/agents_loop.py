"""A coordinator, a coder and a tester working on one task, in-process, with a tool.

    .venv/bin/python examples/agents_loop.py ["Write a Python function that reverses a string."]

Every role runs on the packaged chat model (SmolLM2-135M-Instruct, profile ``starter``), so this
runs anywhere in seconds; with the full plan from models.toml the same code runs each role on its
Qwen model. The agents talk through the ``ITextGenerator``-shaped adapter that multi-agent
programs already use (``generate``, ``generate_with_tools``), and the tester checks the coder's
code with a real Python function through ``arun_tools``. A 135M model writes weak code; the point
is the plumbing: roles, tool calls that always parse, asyncio throughout.
"""

from __future__ import annotations

import ast
import asyncio
import sys

import tongyi_local


def check_python(code: str) -> str:
    """Check that Python source code parses, and list the functions it defines.

    Args:
        code: The Python source code to check.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return f"syntax error on line {exc.lineno}: {exc.msg}"
    names = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    return f"parses; defines {', '.join(names) or 'no functions'}"


async def main(task: str) -> None:
    team = tongyi_local.create_provider("tongyi-local", profile="starter")
    try:
        plan = await team.generate(f"Task: {task}\nWrite a one-sentence plan for the coder.",
                                   role="coordinator", max_tokens=60, temperature=0)
        print(f"coordinator> {plan.strip()}\n")
        code = await team.generate(f"{task}\nPlan: {plan.strip()}\nReply with Python code only.",
                                   role="coder", max_tokens=160, temperature=0)
        print(f"coder> {code.strip()}\n")
        tester = team.generator("tester")
        run = await tongyi_local.arun_tools(
            tester, [{"role": "user", "content": f"Check this code with check_python:\n{code}"}],
            [check_python], tool_choice="required", parallel_tool_calls=False, max_steps=2,
            max_tokens=200, temperature=0)
        for message in run.messages:
            for call in message.tool_calls:
                print(f"tester> calls {call.name}(code=<{len(call.arguments['code'])} chars>)")
            if message.role == "tool":
                print(f"tool> {message.content}")
        print(f"tester> {run.text.strip()}")
    finally:
        await team.close()


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "Write a Python function that reverses a string."))
