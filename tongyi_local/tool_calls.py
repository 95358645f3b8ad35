"""Tool calls in model text: the Qwen2.5 / Hermes ``<tool_call>{...}</tool_call>`` format.

Why here and not in a backend: the local backend reads calls out of the text the model wrote
(remote servers do that on their side and send them structured), and the same rules must hold
whichever local model wrote them: several calls in one turn, text before them kept as content,
a missing closing tag at the very end forgiven, broken JSON or an unknown tool an
``OutputParseError`` that says which call and why. Under a tool grammar none of those errors can
happen; the parser still checks, because ``auto`` lets the model write freely until it opens a
call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import OutputParseError
from .types import Chunk, Completion, Request, Tool, ToolCall, parse_arguments

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


def parse_tool_calls(text: str, tools: Sequence[Tool], *,
                     truncated: bool = False) -> tuple[str, tuple[ToolCall, ...]]:
    """(the text outside the call blocks, the calls in order). Raises ``OutputParseError`` for
    a block that is not ``{"name": ..., "arguments": {...}}`` of a known tool with valid
    arguments. With ``truncated`` (the answer hit max_tokens), a last block cut short is
    dropped when calls before it are complete."""
    by_name = {t.name: t for t in tools}
    calls = []
    blocks = list(_BLOCK.finditer(text))
    for index, match in enumerate(blocks):
        try:
            calls.append(_call(match.group(1), index, by_name))
        except OutputParseError:
            cut_short = truncated and calls and index == len(blocks) - 1 and not \
                match.group(0).endswith(CLOSE)
            if not cut_short:
                raise
    content = _BLOCK.sub("", text).strip() if calls else text
    return content, tuple(calls)


def _call(body: str, index: int, tools: dict[str, Tool]) -> ToolCall:
    where = f"tool call {index + 1}"
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise OutputParseError(f"{where} is not valid JSON ({exc.msg} at character {exc.pos} "
                               "of the call)") from exc
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise OutputParseError(f'{where} is not an object with a "name" string')
    name = value["name"]
    if name not in tools:
        known = ", ".join(tools) or "none"
        raise OutputParseError(f"{where} names tool {name!r}, which was not offered (tools: "
                               f"{known})")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models encode the object as a JSON string
        arguments = parse_arguments(arguments, name)
    if not isinstance(arguments, dict):
        raise OutputParseError(f"{where} ({name}): arguments must be a JSON object, got "
                               f"{type(arguments).__name__}")
    from .schema import validate

    validate(arguments, tools[name].parameters, what=f"the arguments of {where} ({name})")
    return ToolCall(id=new_call_id(), name=name, arguments=arguments)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class CallTextFilter:
    """Streams the text before the first ``<tool_call>`` and holds back the rest, so a caller
    streaming an answer sees content, not the call's raw JSON (which arrives parsed at the end)."""

    def __init__(self) -> None:
        self._seen = ""
        self._emitted = 0
        self._capturing = False

    def feed(self, text: str) -> str:
        if self._capturing or not text:
            return ""
        self._seen += text
        at = self._seen.find(OPEN)
        if at >= 0:
            self._capturing = True
            safe = at
        else:
            safe = len(self._seen) - _partial_open(self._seen)
        out = self._seen[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return out

    def rest(self, content: str) -> str:
        """What of the final ``content`` has not been streamed yet."""
        return content[self._emitted:] if content.startswith(self._seen[:self._emitted]) else ""


def _partial_open(text: str) -> int:
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


@dataclass
class AnswerShaper:
    """Turns a local model's raw answer into the typed one the request asked for: tool calls
    parsed out of the text, a structured value parsed and validated. One per request."""

    request: Request
    model: str

    def __post_init__(self) -> None:
        self._filter = CallTextFilter() if self.request.calls_tools else None

    def text(self, text: str) -> str:
        return self._filter.feed(text) if self._filter is not None else text

    def final(self, chunk: Chunk) -> Chunk:
        completion = self.shape(chunk.completion)
        tail = chunk.text if self._filter is None else self._filter.rest(completion.text)
        return replace(chunk, text=tail, finish_reason=completion.finish_reason,
                       completion=completion)

    def shape(self, completion: Completion) -> Completion:
        request = self.request
        if request.calls_tools:
            try:
                content, calls = parse_tool_calls(completion.text, request.tools,
                                                  truncated=completion.finish_reason == "length")
            except OutputParseError as exc:
                if completion.finish_reason != "length":
                    raise
                raise OutputParseError(
                    f"{self.model} reached max_tokens={request.sampling.max_tokens} inside a "
                    f"tool call ({exc}); raise max_tokens") from exc
            if calls:
                completion = replace(completion, text=content, tool_calls=calls,
                                     finish_reason="tool_calls"
                                     if completion.finish_reason == "stop"
                                     else completion.finish_reason)
        return check_answer(completion, request, self.model)


def check_answer(completion: Completion, request: Request, model: str) -> Completion:
    """The answer the request asked for, or ``OutputParseError``: a required or named tool call
    made, a ``response_schema`` value parsed, validated and built (into ``parsed``). Shared by
    the local backend and the remote ones, whose servers may not enforce either."""
    choice = request.tool_choice
    if choice.mode in ("required", "named"):
        names = [c.name for c in completion.tool_calls]
        if not names or (choice.mode == "named" and choice.name not in names):
            wanted = f"a call of {choice.name!r}" if choice.mode == "named" else "a tool call"
            raise OutputParseError(
                f"{model} ended its answer (finish_reason={completion.finish_reason}) without "
                f"{wanted}, which tool_choice requires"
                + ("; raise max_tokens" if completion.finish_reason == "length" else ""))
    if request.response_schema is not None:
        if completion.finish_reason == "length":
            raise OutputParseError(
                f"{model} reached max_tokens={request.sampling.max_tokens} before the "
                f"{request.response_schema.name} value was complete; raise max_tokens")
        return replace(completion, parsed=request.response_schema.parse(completion.text))
    return completion
