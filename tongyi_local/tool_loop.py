"""The agent loop: the model calls tools, Python runs them, the results go back, until text.

    run = tongyi_local.run_tools(model, messages, [get_weather, search], max_steps=8)
    run.text, run.messages, run.steps

Why in the library: every agent writes this loop, and the details are easy to get wrong: the
results must go back as ``tool`` messages carrying the call's id, a tool that raises must become a
message the model can read (not a crash of the agent), and the loop must end. Works with any
``Generator`` (local, role, fallback, remote, fake); ``arun_tools`` is the asyncio form, which
also awaits ``async def`` tools.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidRequestError
from .types import Completion, Generator, Message, Tool, ToolCall, coerce_messages

log = logging.getLogger("tongyi_local.tools")


@dataclass(frozen=True)
class ToolRun:
    """How a tool loop ended: the last answer, the whole conversation, the model calls made."""

    completion: Completion
    messages: tuple[Message, ...]
    steps: int

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def finished(self) -> bool:
        """False when ``max_steps`` ran out while the model still wanted to call tools."""
        return not self.completion.tool_calls


def run_tools(generator: Generator, messages: Sequence[Message | Mapping[str, Any]],
              functions: Sequence[Callable[..., Any] | Tool] | Mapping[str, Callable[..., Any]],
              *, max_steps: int = 8, tool_choice: Any = None, **options: Any) -> ToolRun:
    """Chat with ``functions`` as tools until the model answers in text or ``max_steps``
    model calls were made. ``tool_choice`` applies to the first call (later ones are
    ``auto``, or the loop could not end); other options go to every ``chat``."""
    tools, table = _tool_table(functions)
    if any(inspect.iscoroutinefunction(f) for f in table.values()):
        raise InvalidRequestError("some tools are async functions; use arun_tools")
    history, steps = _start(messages, max_steps), 0
    while True:
        completion = generator.chat(history, tools=tools, tool_choice=tool_choice, **options)
        steps, tool_choice = steps + 1, None
        history.append(_assistant(completion))
        if not completion.tool_calls or steps >= max_steps:
            return ToolRun(completion, tuple(history), steps)
        for call in completion.tool_calls:
            history.append(_result(call, _invoke(table, call)))


async def arun_tools(generator: Generator, messages: Sequence[Message | Mapping[str, Any]],
                     functions: Sequence[Callable[..., Any] | Tool]
                     | Mapping[str, Callable[..., Any]],
                     *, max_steps: int = 8, tool_choice: Any = None, **options: Any) -> ToolRun:
    """``run_tools`` for asyncio: ``achat``, and ``async def`` tools awaited (sync tools run in
    a worker thread so the event loop is not blocked)."""
    tools, table = _tool_table(functions)
    history, steps = _start(messages, max_steps), 0
    while True:
        completion = await generator.achat(history, tools=tools, tool_choice=tool_choice,
                                           **options)
        steps, tool_choice = steps + 1, None
        history.append(_assistant(completion))
        if not completion.tool_calls or steps >= max_steps:
            return ToolRun(completion, tuple(history), steps)
        for call in completion.tool_calls:
            history.append(_result(call, await _ainvoke(table, call)))


def _start(messages: Sequence[Message | Mapping[str, Any]], max_steps: int) -> list[Message]:
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise InvalidRequestError(f"max_steps must be an integer >= 1 (got {max_steps!r})")
    return list(coerce_messages(messages))


def _tool_table(functions: Any) -> tuple[tuple[Tool, ...], dict[str, Callable[..., Any]]]:
    """The tools to offer and the callable behind each name."""
    if isinstance(functions, Mapping):  # name -> function: the names the model sees
        items = [replace(Tool.coerce(f), name=name, function=f) for name, f in functions.items()]
    else:
        items = [Tool.coerce(f) for f in functions]
    table = {t.name: t.function for t in items}
    missing = [name for name, f in table.items() if not callable(f)]
    if missing:
        raise InvalidRequestError(f"tool(s) {', '.join(missing)} have no Python function to run; "
                                  "pass functions, or Tools made from functions")
    if not items:
        raise InvalidRequestError("run_tools needs at least one function")
    return tuple(items), table


def _assistant(completion: Completion) -> Message:
    return Message("assistant", completion.text, tool_calls=completion.tool_calls)


def _result(call: ToolCall, content: str) -> Message:
    return Message("tool", content, tool_call_id=call.id)


def _invoke(table: Mapping[str, Callable[..., Any]], call: ToolCall) -> str:
    try:
        return _as_text(table[call.name](**call.arguments))
    except Exception as exc:  # noqa: BLE001 - the model reads what went wrong and may retry
        return _error_text(call, exc)


async def _ainvoke(table: Mapping[str, Callable[..., Any]], call: ToolCall) -> str:
    function = table[call.name]
    try:
        if inspect.iscoroutinefunction(function):
            result = await function(**call.arguments)
        else:
            result = await asyncio.to_thread(function, **call.arguments)
        if isinstance(result, Awaitable):
            result = await result
        return _as_text(result)
    except Exception as exc:  # noqa: BLE001 - the model reads what went wrong and may retry
        return _error_text(call, exc)


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)


def _error_text(call: ToolCall, exc: Exception) -> str:
    log.info("tool %s raised %s; the error goes back to the model", call.name,
             type(exc).__name__)
    return f"error: {call.name} raised {type(exc).__name__}: {exc}"
