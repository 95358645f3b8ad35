"""Pieces both remote backends need: the OpenAI-style wire form of messages, assembling tool
calls from stream deltas, timings measured from the stream, and API-key lookup.

Why shared: DashScope's message format and OpenAI's are the same JSON shape, and the rules (keys
read at call time and never shown; TTFT measured at the first streamed piece) must be one rule.
No SDK is imported here.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import AuthenticationError, ConfigError
from ..types import (Completion, FinishReason, Message, Request, Sampling, Timings, ToolCall,
                     Usage)


class NotProtocol(ValueError):
    """A server's answer broke the protocol's shape (raised by our parsers, mapped to
    ``ResponseFormatError`` at the edge). Anything else our parsers raise is our bug, and is
    left to propagate instead of being dressed up as advice about ``base_url``."""


def as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object (an absent one is empty), else ``NotProtocol``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise NotProtocol(f"{what} is not a JSON object")
    return value


def as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NotProtocol(f"{what} is not a JSON array")
    return value


def as_count(value: Any, what: str) -> int | None:
    """A token count: a non-negative integer, or absent."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise NotProtocol(f"{what} is not a token count")
    return value


def wire_messages(messages: Iterable[Message]) -> list[dict[str, Any]]:
    """Messages as OpenAI-style dicts (DashScope accepts the same shape)."""
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


class ToolCallAssembler:
    """Joins streamed tool-call deltas by ``index``: the id and name arrive once (some servers
    repeat them in every delta), the arguments arrive in pieces to be concatenated."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> bool:
        added = False
        for position, delta in enumerate(as_list(deltas, "tool_calls")):
            delta = as_mapping(delta, "a tool call delta")
            index = delta.get("index", position)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            function = as_mapping(delta.get("function"), "a tool call's function")
            if delta.get("id") and not call["id"]:
                call["id"] = str(delta["id"])
            if function.get("name") and not call["name"]:
                call["name"] = str(function["name"])
            if function.get("arguments"):
                call["arguments"] += str(function["arguments"])
            added = True
        return added

    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(id=c["id"] or f"call_{i}", name=c["name"],
                              arguments=c["arguments"] or "{}")
                     for i, c in sorted(self._calls.items()) if c["name"])


def wire_tools(request: Request) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in the OpenAI wire form
    (DashScope takes the same), or nothing when the request offers no tools."""
    if not request.tools:
        return {}
    choice = request.tool_choice
    body: dict[str, Any] = {"tools": [t.to_openai() for t in request.tools],
                            "tool_choice": (choice.mode if choice.mode != "named" else
                                            {"type": "function", "function": {"name": choice.name}})}
    if not request.parallel_tool_calls:
        body["parallel_tool_calls"] = False
    return body


def finish_reason(raw: object, has_tool_calls: bool) -> FinishReason:
    """Servers' finish reasons onto ours (``content_filter`` and the like count as a stop)."""
    if raw in ("tool_calls", "function_call") or (has_tool_calls and raw in ("stop", None)):
        return "tool_calls"
    if raw == "length":
        return "length"
    return "stop"


class StreamClock:
    """Times a streamed request from the call: TTFT at the first piece, decode until the last."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.first: float | None = None
        self.last: float | None = None
        self.pieces = 0

    def piece(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces += 1

    def completion(self, *, text: str, raw_finish: object, tool_calls: tuple[ToolCall, ...],
                   prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int,
                   model: str, server_timings: Mapping[str, Any] | None = None) -> Completion:
        """The final result. Without server-reported usage, completion tokens are the number of
        streamed pieces (servers send about one per token) and prompt tokens are 0."""
        end = time.perf_counter()
        completion_tokens = completion_tokens if completion_tokens is not None else self.pieces
        ttft = ((self.first or end) - self.start) * 1e3
        decode_ms = ((self.last or end) - (self.first or end)) * 1e3
        prompt_ms = 0.0
        if server_timings:  # llama.cpp's server reports its own prompt/decode figures
            prompt_ms = float(server_timings.get("prompt_ms") or 0.0)
            decode_ms = float(server_timings.get("predicted_ms") or decode_ms)
        timings = Timings(prompt_eval_ms=prompt_ms, prompt_eval_tokens=prompt_tokens or 0,
                          ttft_ms=ttft, decode_ms=decode_ms,
                          decode_tokens=max(completion_tokens - 1, 0),
                          total_ms=(end - self.start) * 1e3)
        usage = Usage(prompt_tokens=prompt_tokens or 0, completion_tokens=completion_tokens,
                      cached_prompt_tokens=cached_tokens)
        return Completion(text=text, finish_reason=finish_reason(raw_finish, bool(tool_calls)),
                          usage=usage, timings=timings, model=model, tool_calls=tool_calls)


class StreamedAnswer:
    """What one remote answer has accumulated from its stream: text pieces, tool calls, finish
    reason, usage and (from llama.cpp's server) its own timings. Each protocol's parser fills
    it from its own events and names its usage keys; the final ``Completion`` is made here."""

    PROMPT_KEY = "prompt_tokens"
    COMPLETION_KEY = "completion_tokens"

    def __init__(self, clock: StreamClock) -> None:
        self.clock = clock
        self.tools = ToolCallAssembler()
        self.parts: list[str] = []
        self.raw_finish: object = None
        self.usage: Mapping[str, Any] = {}
        self.timings: Mapping[str, Any] | None = None

    def add_text(self, text: str) -> str:
        """Keep a new piece of text (timed as a streamed piece); return it."""
        self.clock.piece()
        self.parts.append(text)
        return text

    def completion(self, model: str) -> Completion:
        details = as_mapping(self.usage.get("prompt_tokens_details"), "prompt_tokens_details")
        return self.clock.completion(
            text="".join(self.parts), raw_finish=self.raw_finish, tool_calls=self.tools.calls(),
            prompt_tokens=as_count(self.usage.get(self.PROMPT_KEY), self.PROMPT_KEY),
            completion_tokens=as_count(self.usage.get(self.COMPLETION_KEY), self.COMPLETION_KEY),
            cached_tokens=as_count(details.get("cached_tokens"), "cached_tokens") or 0,
            model=model, server_timings=self.timings)


class Secret:
    """Holds an API key so that repr(), str() and vars() dumps show ``***``, never the key."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def resolve_key(explicit: Secret | None, env_name: str | None, backend: str, *,
                required: bool) -> str | None:
    """The API key: the argument, else the named environment variable read now (not at import).

    A required key that is missing is an ``AuthenticationError`` before any request is made.
    """
    if explicit is not None and explicit.get():
        return explicit.get()
    value = os.environ.get(env_name, "").strip() if env_name else ""
    if value:
        return value
    if required:
        where = f"set {env_name} in the environment or " if env_name else ""
        raise AuthenticationError(f"{backend}: no API key; {where}pass api_key= to the generator",
                                  backend=backend)
    return None


_SECRETS = re.compile(r"(Bearer\s+)\S+|\bsk-[A-Za-z0-9_\-]{6,}", re.IGNORECASE)


def redact(text: str, *secrets: Secret | str | None) -> str:
    """Text with any of ``secrets`` and anything key-shaped (``Bearer x``, ``sk-...``) masked."""
    for secret in secrets:
        secret = secret.get() if isinstance(secret, Secret) else secret
        if secret:
            text = text.replace(secret, "***")
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "***", text)


def short(text: str, limit: int = 300) -> str:
    """A server's error text, bounded so a huge HTML page does not become the message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def coerce_sampling(value: Sampling | Mapping[str, Any] | None) -> Sampling | None:
    """A default Sampling from a Sampling or a plain mapping (as models.toml gives it)."""
    if value is None or isinstance(value, Sampling):
        return value
    if isinstance(value, Mapping):
        return Sampling().merged(value)
    raise ConfigError(f"sampling must be a Sampling or a mapping, got {type(value).__name__}")


def retry_after(headers: Mapping[str, Any]) -> float | None:
    """A server's Retry-After (seconds form) as a float, if it sent one."""
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return max(float(v), 0.0)
            except (TypeError, ValueError):
                return None
    return None
