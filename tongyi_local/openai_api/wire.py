"""OpenAI's REST shapes, both ways: request bodies to typed calls, results to response bodies.

Why its own module: the transport, the ASGI server and their tests all speak the same wire
format, and it must be written once. Requests are checked here, before any model is touched; a
field that would change the answer and that the library cannot honour (``n`` > 1, logprobs,
logit_bias, non-zero presence/frequency penalties) is refused with 400 rather than ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError
from ..types import Chunk, Completion, Message, ResponseSchema, Tool, ToolCall, Usage

# Sampling fields a request may set, by their OpenAI names (llama-server's extensions included).
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
                    "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty",
                    "ignore_eos": "ignore_eos"}


class WireError(InvalidRequestError):
    """A request the OpenAI API would refuse: its HTTP status, and the field at fault."""

    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class UnknownModelError(WireError):
    """``model`` is neither a role nor a model of models.toml (404, as OpenAI answers)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} is neither a role nor a model of models.toml; "
                         f"known: {', '.join(known) or '(none)'}", "model", status=404,
                         code="model_not_found")


@dataclass(frozen=True)
class Call:
    """One request: which model (role or model name) and how to sample, streamed or not."""

    model: str
    options: Mapping[str, Any]  # Sampling overrides; fields left out keep the model's defaults
    stream: bool = False
    include_usage: bool = False

    def input(self) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError


@dataclass(frozen=True)
class ChatCall(Call):
    messages: tuple[Message, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_schema: ResponseSchema | None = None

    def input(self) -> tuple[Any, dict[str, Any]]:
        """What ``chat`` / ``stream`` take: the messages and the keyword arguments."""
        return self.messages, self.arguments()

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``Generator.chat`` / ``stream``."""
        extra = {} if self.parallel_tool_calls is None else {
            "parallel_tool_calls": self.parallel_tool_calls}
        return {"tools": self.tools or None, "tool_choice": self.tool_choice,
                "response_schema": self.response_schema, **self.options, **extra}


@dataclass(frozen=True)
class TextCall(Call):
    prompt: str = ""

    def input(self) -> tuple[Any, dict[str, Any]]:
        """What ``complete`` / ``stream`` take: the prompt and the sampling options."""
        return self.prompt, dict(self.options)


def decode_body(body: bytes) -> Mapping[str, Any]:
    try:
        value = json.loads(body or b"null")
    except ValueError as exc:
        raise WireError(f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(value, Mapping):
        raise WireError("the request body must be a JSON object")
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise WireError("'model' is required: a role or a model name from models.toml "
                        "(GET /v1/models lists them)", "model")
    return model


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling overrides from the body; values are checked by ``Sampling`` itself."""
    if body.get("n") not in (None, 1):
        raise WireError("only n=1 is supported", "n")
    for name in ("logprobs", "top_logprobs", "logit_bias", "presence_penalty",
                 "frequency_penalty", "echo", "best_of", "suffix"):
        value = body.get(name)
        if value not in (None, False, 0, {}, "") and not (name == "best_of" and value == 1):
            raise WireError(f"{name!r} is not supported by local models; leave it out", name)
    options = {ours: body[theirs] for theirs, ours in _SAMPLING_FIELDS.items()
               if body.get(theirs) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        options["max_tokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise WireError("'stop' must be a string or a list of strings", "stop")
        options["stop"] = tuple(stop)
    return options


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise WireError("'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise WireError("'stream_options' must be an object", "stream_options")
    return stream, bool(stream_options.get("include_usage"))


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (other parts are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise WireError(f"{where}: content part of type {kind!r} is not supported "
                                "(text only)", where)
            texts.append(part["text"])
        return "".join(texts)
    raise WireError(f"{where}: content must be a string or a list of text parts", where)


def _message(value: Any, index: int) -> Message:
    where = f"messages[{index}]"
    if not isinstance(value, Mapping):
        raise WireError(f"{where} must be an object with 'role' and 'content'", where)
    role = "system" if value.get("role") == "developer" else value.get("role")
    return Message.coerce({**value, "role": role, "content": _text(value.get("content"), where)})


def _response_schema(value: Any) -> ResponseSchema | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseSchema({"type": "object"}, name="json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise WireError("response_format json_schema needs {'name': ..., 'schema': {...}}",
                            "response_format")
        schema = ResponseSchema.coerce(spec["schema"])
        name = spec.get("name")
        return ResponseSchema(schema.schema, name=name) if isinstance(name, str) else schema
    raise WireError("response_format type must be 'text', 'json_object' or 'json_schema'",
                    "response_format")


def chat_call(body: Mapping[str, Any]) -> ChatCall:
    """``POST /v1/chat/completions`` body → typed call (400 on anything malformed)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise WireError("'messages' must be a non-empty list", "messages")
    tools = body.get("tools") or ()
    if not isinstance(tools, list | tuple):
        raise WireError("'tools' must be a list", "tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise WireError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    stream, include_usage = _stream_flags(body)
    return ChatCall(model=_model(body), options=_options(body), stream=stream,
                    include_usage=include_usage,
                    messages=tuple(_message(m, i) for i, m in enumerate(messages)),
                    tools=tuple(Tool.coerce(t) for t in tools),
                    tool_choice=body.get("tool_choice"), parallel_tool_calls=parallel,
                    response_schema=_response_schema(body.get("response_format")))


def text_call(body: Mapping[str, Any]) -> TextCall:
    """``POST /v1/completions`` body → typed call."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise WireError("'prompt' must be a string (token arrays and batches are not "
                        "supported)", "prompt")
    stream, include_usage = _stream_flags(body)
    return TextCall(model=_model(body), options=_options(body), stream=stream,
                    include_usage=include_usage, prompt=prompt)


# --- responses ------------------------------------------------------------------------------

def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def _tool_call_body(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments_json}}
    return body if index is None else {"index": index, **body}


def assistant_message(completion: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": completion.text or None if completion.tool_calls
                               else completion.text}
    if completion.tool_calls:
        message["tool_calls"] = [_tool_call_body(c) for c in completion.tool_calls]
    return message


@dataclass
class ResponseIds:
    """The id, timestamp and model name every object of one response repeats."""

    model: str
    prefix: str = "chatcmpl"
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.prefix}-{uuid.uuid4().hex}"

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": "tongyi-local"}


def chat_body(completion: Completion, ids: ResponseIds) -> dict[str, Any]:
    return {**ids.head("chat.completion"),
            "choices": [{"index": 0, "message": assistant_message(completion),
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": usage_body(completion.usage)}


def text_body(completion: Completion, ids: ResponseIds) -> dict[str, Any]:
    return {**ids.head("text_completion"),
            "choices": [{"index": 0, "text": completion.text, "logprobs": None,
                         "finish_reason": completion.finish_reason}],
            "usage": usage_body(completion.usage)}


def sse(value: Mapping[str, Any] | str) -> bytes:
    data = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class ChatEvents:
    """Server-sent events of one streamed chat completion, chunk by chunk.

    Tool calls are held back by the generator until they parse, so they arrive whole, in one
    delta before the last chunk (as the OpenAI API's own streams end)."""

    def __init__(self, ids: ResponseIds, include_usage: bool) -> None:
        self.ids, self.include_usage = ids, include_usage

    def _chunk(self, delta: Mapping[str, Any], finish: str | None = None) -> bytes:
        return sse({**self.ids.head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                 "logprobs": None}]})

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def opening(self) -> list[bytes]:
        """The events before the first chunk's."""
        start = self.start()
        return [start] if start else []

    def of(self, chunk: Chunk) -> list[bytes]:
        """The events one chunk of the stream gives (its text; the end, on the last one)."""
        text = self.text(chunk)
        events = [text] if text else []
        return events + self.end(chunk.completion) if chunk.completion is not None else events

    def text(self, chunk: Chunk) -> bytes | None:
        return self._chunk({"content": chunk.text}) if chunk.text else None

    def end(self, completion: Completion) -> list[bytes]:
        events = []
        if completion.tool_calls:
            events.append(self._chunk({"tool_calls": [
                _tool_call_body(c, i) for i, c in enumerate(completion.tool_calls)]}))
        events.append(self._chunk({}, completion.finish_reason))
        if self.include_usage:
            events.append(sse({**self.ids.head("chat.completion.chunk"), "choices": [],
                               "usage": usage_body(completion.usage)}))
        return [*events, DONE]


class TextEvents(ChatEvents):
    """Server-sent events of one streamed text completion."""

    def _text_chunk(self, text: str, finish: str | None = None) -> bytes:
        return sse({**self.ids.head("text_completion"),
                    "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": None}]})

    def start(self) -> bytes | None:  # type: ignore[override]
        return None

    def text(self, chunk: Chunk) -> bytes | None:
        return self._text_chunk(chunk.text) if chunk.text else None

    def end(self, completion: Completion) -> list[bytes]:
        events = [self._text_chunk("", completion.finish_reason)]
        if self.include_usage:
            events.append(sse({**self.ids.head("text_completion"), "choices": [],
                               "usage": usage_body(completion.usage)}))
        return [*events, DONE]
