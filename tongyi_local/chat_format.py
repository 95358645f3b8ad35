"""Chat requests as prompt text: the GGUF's own Jinja template, rendered with tools.

Why Jinja and not ``llama_chat_apply_template``: llama.cpp's C function recognises templates by
pattern and cannot render ``tools``; Qwen2.5's template puts them in a ``<tools>`` block of the
system turn and expects tool results as ``<tool_response>`` blocks. As transformers and
llama-cpp-python do, the template runs in jinja2's ``ImmutableSandboxedEnvironment``, so a
template (which comes from a downloaded file) cannot reach Python internals or mutate its inputs.

A template that knows nothing of tools gets them the documented way (``TOOL_SYSTEM_PROMPT``: the
Qwen2.5 / Hermes wording, in the system turn), with earlier calls and results written as
``<tool_call>`` and ``<tool_response>`` text, so every model is asked in the format the tool-call
parser (``tool_calls.py``) reads.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequestError
from .types import Message, Tool

TOOL_SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')

SCHEMA_PROMPT = ("Answer with one JSON value, and nothing else, that matches this JSON schema:\n"
                 "{schema}")


def render(template: str, messages: Sequence[Message], tools: Sequence[Tool] = (), *,
           bos_token: str = "", eos_token: str = "", model: str = "the model") -> str:
    """The prompt text for ``messages`` (and ``tools``) through ``template``, ending with the
    assistant's turn opened. Template failures are ``InvalidRequestError`` naming the model."""
    compiled = _compile(template, model)
    native_tools = bool(tools) and supports_tools(template)
    if tools and not native_tools:
        messages = with_tool_prompt(messages, tools)
    if not native_tools:
        messages = tools_as_text(messages)
    try:
        return compiled.render(
            messages=[_template_message(m) for m in messages],
            tools=[t.to_openai() for t in tools] if native_tools else None,
            add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    except _jinja().exceptions.SecurityError as exc:
        raise InvalidRequestError(f"the chat template of {model} tried an operation the "
                                  f"sandbox forbids ({exc}); it was not run. Use complete() "
                                  "with a prompt you format yourself") from exc
    except _jinja().exceptions.TemplateError as exc:
        raise InvalidRequestError(f"the chat template of {model} refused these messages: "
                                  f"{exc}") from exc


def supports_tools(template: str) -> bool:
    """Whether a template renders a ``tools`` list itself (the heuristic transformers uses)."""
    return "tools" in template


def with_tool_prompt(messages: Sequence[Message], tools: Sequence[Tool]) -> tuple[Message, ...]:
    """The tool list in the system turn (a new one first, or appended to the existing one)."""
    listing = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
    prompt = TOOL_SYSTEM_PROMPT.format(tools=listing)
    if messages and messages[0].role == "system":
        first = messages[0]
        return (Message("system", f"{first.content}\n\n{prompt}"), *messages[1:])
    return (Message("system", prompt), *messages)


def with_schema_instruction(messages: Sequence[Message],
                            schema: Mapping[str, Any]) -> tuple[Message, ...]:
    """The JSON schema an answer must match, said in the system turn."""
    note = SCHEMA_PROMPT.format(schema=json.dumps(dict(schema), ensure_ascii=False))
    if messages and messages[0].role == "system":
        return (Message("system", f"{messages[0].content}\n\n{note}"), *messages[1:])
    return (Message("system", note), *messages)


def tools_as_text(messages: Sequence[Message]) -> tuple[Message, ...]:
    """Earlier tool calls and results as the text a tool-unaware template can show: calls as
    ``<tool_call>`` blocks in the assistant turn, results as ``<tool_response>`` user turns."""
    out: list[Message] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            blocks = "\n".join(call_text(c.name, c.arguments) for c in m.tool_calls)
            out.append(Message("assistant", f"{m.content}\n{blocks}" if m.content else blocks))
        elif m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = Message("user", f"{out[-1].content}\n{block}")
            else:
                out.append(Message("user", block))
        else:
            out.append(m)
    return tuple(out)


def call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """One call in the format the model is asked to write."""
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _template_message(m: Message) -> dict[str, Any]:
    item: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        item["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}}
                              for c in m.tool_calls]
    if m.tool_call_id is not None:
        item["tool_call_id"] = m.tool_call_id
    return item


def _jinja() -> Any:
    import jinja2
    import jinja2.exceptions  # noqa: F401 - used through the module
    import jinja2.sandbox  # noqa: F401

    return jinja2


@functools.lru_cache(maxsize=16)
def _compile(template: str, model: str) -> Any:
    jinja2 = _jinja()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       undefined=jinja2.Undefined)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidRequestError(f"the chat template of {model} is not valid Jinja ({exc}); "
                                  "use complete() with a prompt you format yourself") from exc


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: plain JSON (Jinja's own escapes ``<``, ``>`` and quotes)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise _jinja().exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)
