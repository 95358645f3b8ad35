"""The Generator protocol and the typed values that cross it.

Why: agent code must not care whether a role runs on the local llama.cpp, DashScope or an
OpenAI-compatible server, so every backend speaks these types. Results carry usage and timings as
typed fields (Ollama returns the same figures as loose JSON keys).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

from .display import COMPLETION, TIMINGS, TOOL_CALL, Rendered
from .errors import InvalidRequestError, OutputParseError

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, repr=False)
class ToolCall(Rendered):
    """A call the model asked for; ``arguments`` is the parsed JSON object the model produced."""

    _renderer = TOOL_CALL  # Jupyter display and repr: display.py

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.arguments, str):  # the wire form: JSON text
            object.__setattr__(self, "arguments", parse_arguments(self.arguments, self.name))
        if not isinstance(self.arguments, Mapping):
            raise InvalidRequestError(f"tool call {self.name!r}: arguments must be a JSON object, "
                                      f"got {type(self.arguments).__name__}")
        object.__setattr__(self, "arguments", dict(self.arguments))

    @property
    def arguments_json(self) -> str:
        """The arguments as JSON text, as OpenAI-style APIs carry them."""
        return json.dumps(self.arguments, ensure_ascii=False)

    def __hash__(self) -> int:
        return hash((self.id, self.name, self.arguments_json))


def parse_arguments(text: str, tool: str) -> dict[str, Any]:
    """A tool call's JSON arguments text as a dict; anything else is an ``OutputParseError``."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise OutputParseError(f"the arguments of tool call {tool!r} are not valid JSON "
                               f"({exc.msg} at character {exc.pos})") from exc
    if not isinstance(value, dict):
        raise OutputParseError(f"the arguments of tool call {tool!r} are not a JSON object "
                               f"(got {type(value).__name__})")
    return value


@dataclass(frozen=True)
class Tool:
    """A function the model may call: OpenAI-style name, description and JSON-schema parameters.

    ``function`` (not compared) is the Python callable behind it, when the tool was made from
    one, so ``run_tools`` can call it.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}})
    function: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TOOL_NAME.fullmatch(self.name):
            raise InvalidRequestError(f"tool name {self.name!r} must be 1-64 letters, digits, "
                                      "'_' or '-'")
        if not isinstance(self.description, str):
            raise InvalidRequestError(f"tool {self.name!r}: description must be text")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type") != "object":
            raise InvalidRequestError(f"tool {self.name!r}: parameters must be a JSON schema "
                                      "of type 'object'")
        check_schema(self.parameters, what=f"tool {self.name!r} parameters")

    @classmethod
    def coerce(cls, value: Tool | Mapping[str, Any] | Any) -> Tool:
        """A ``Tool``, an OpenAI tool dict (``{"type": "function", "function": {...}}`` or the
        inner ``{"name", "description", "parameters"}``) or a typed Python function."""
        if isinstance(value, Tool):
            return value
        if isinstance(value, Mapping):
            spec = value.get("function", value) if value.get("type", "function") == "function" \
                else None
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise InvalidRequestError(
                    "a tool must be {'type': 'function', 'function': {'name': ..., "
                    "'parameters': {...}}}, a Tool or a Python function")
            unknown = sorted(set(spec) - {"name", "description", "parameters", "strict"})
            if unknown:
                raise InvalidRequestError(f"tool {spec['name']!r}: unknown field(s) "
                                          f"{', '.join(unknown)}")
            return cls(name=spec["name"], description=spec.get("description") or "",
                       parameters=spec.get("parameters") or {"type": "object", "properties": {}})
        if callable(value):
            from .schema import function_schema

            name, description, parameters = function_schema(value)
            return cls(name=name, description=description, parameters=parameters, function=value)
        raise InvalidRequestError(f"a tool must be a Tool, an OpenAI tool dict or a Python "
                                  f"function, got {type(value).__name__}")

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI wire form (also what chat templates receive as ``tools``)."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": dict(self.parameters)}}


def check_schema(schema: Mapping[str, Any], *, what: str) -> None:
    """A JSON schema that is not valid (by its metaschema) is the caller's error, named."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        pointer = "".join(f"/{p}" for p in exc.path) or "/"
        raise InvalidRequestError(f"{what}: invalid JSON schema at {pointer}: "
                                  f"{exc.message[:200]}") from exc


_TOOL_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


@dataclass(frozen=True)
class ToolChoice:
    """Whether the model may (``auto``), must not (``none``) or must (``required``) call a tool,
    or must call the one named (``mode="named"``, ``name``)."""

    mode: Literal["auto", "none", "required", "named"] = "auto"
    name: str | None = None

    @classmethod
    def coerce(cls, value: ToolChoice | str | Mapping[str, Any] | None,
               tools: tuple[Tool, ...]) -> ToolChoice:
        if value is None:
            return cls()
        if isinstance(value, ToolChoice):
            choice = value
        elif isinstance(value, str) and value in ("auto", "none", "required"):
            choice = cls(value)
        elif isinstance(value, Mapping):
            inner = value.get("function", value)
            name = inner.get("name") if isinstance(inner, Mapping) else None
            if not isinstance(name, str):
                raise InvalidRequestError(f"tool_choice {value!r} must name a tool: "
                                          "{'name': ...} or {'type': 'function', "
                                          "'function': {'name': ...}}")
            choice = cls("named", name)
        else:
            raise InvalidRequestError(f"tool_choice must be 'auto', 'none', 'required' or "
                                      f"{{'name': ...}} (got {value!r})")
        if choice.mode in ("required", "named") and not tools:
            raise InvalidRequestError(f"tool_choice {choice.mode!r} needs tools=")
        if choice.mode == "named" and choice.name not in {t.name for t in tools}:
            raise InvalidRequestError(f"tool_choice names {choice.name!r}, which is not one of "
                                      f"the tools ({', '.join(t.name for t in tools)})")
        return choice


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(
                f"message role {self.role!r} is not one of system, user, assistant, tool")
        if not isinstance(self.content, str):
            raise InvalidRequestError(f"message content must be text, got {type(self.content).__name__}")

    @classmethod
    def coerce(cls, value: Message | Mapping[str, Any]) -> Message:
        """Accept ``Message`` or OpenAI-style ``{"role": ..., "content": ...}`` dicts."""
        if isinstance(value, Message):
            return value
        if isinstance(value, Mapping) and "role" in value:
            calls = tuple(_coerce_call(c) for c in value.get("tool_calls") or ())
            return cls(role=value["role"], content=value.get("content") or "",
                       tool_calls=calls, tool_call_id=value.get("tool_call_id"))
        raise InvalidRequestError(
            "each message must be a Message or a mapping with 'role' and 'content'")


def _coerce_call(value: ToolCall | Mapping[str, Any]) -> ToolCall:
    """A tool call of an assistant message: ``ToolCall`` or OpenAI's wire dict."""
    if isinstance(value, ToolCall):
        return value
    if isinstance(value, Mapping):
        inner = value.get("function", value)
        if isinstance(inner, Mapping) and isinstance(inner.get("name"), str):
            try:
                return ToolCall(id=str(value.get("id") or ""), name=inner["name"],
                                arguments=inner.get("arguments") or {})
            except OutputParseError as exc:
                raise InvalidRequestError(str(exc)) from exc
    raise InvalidRequestError("an assistant message's tool_calls must be ToolCall objects or "
                              "{'id': ..., 'function': {'name': ..., 'arguments': ...}}")


def coerce_messages(messages: Sequence[Message | Mapping[str, Any]]) -> tuple[Message, ...]:
    if isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of messages")
    coerced = tuple(Message.coerce(m) for m in messages)
    _check_tool_results(coerced)
    return coerced


def _check_tool_results(messages: tuple[Message, ...]) -> None:
    """Every ``tool`` message answers a call an earlier assistant message made, by its id."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        called.update(c.id for c in m.tool_calls)
        if m.role == "tool" and m.tool_call_id not in called:
            known = ", ".join(sorted(called)) or "none"
            raise InvalidRequestError(
                f"message {i} is a tool result for call id {m.tool_call_id!r}, but no earlier "
                f"assistant message made that call (call ids so far: {known})")


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. ``temperature=0`` is greedy (deterministic).

    ``seed`` makes temperature sampling repeatable for the same prompt and model state; reusing a
    cached prompt prefix evaluates the prompt in other batch splits, which can change low-order
    bits of the logits (as with llama-server's cache_prompt). Validated on construction, so a bad
    value fails before any work is done.

    ``deterministic=True`` (local backend) runs the request alone on an emptied KV cache, so
    greedy text is the same whatever else the model serves; llama.cpp's quantized kernels are not
    batch-invariant, so without it a greedy request decoded beside others, or after a reused
    prefix, may take another path at a near-tie. It costs the batching and the prefix cache for
    that request. Remote backends cannot promise it and ignore it.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if not _integer(self.max_tokens) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r}); 0 is greedy")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not _integer(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r}); 0 disables it")
        if not _finite(self.min_p) or not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (got {self.min_p!r})")
        if not _finite(self.repeat_penalty) or self.repeat_penalty <= 0:
            problems.append(f"repeat_penalty must be > 0 (got {self.repeat_penalty!r}); 1 disables it")
        if not _integer(self.repeat_last_n) or self.repeat_last_n < 0:
            problems.append(f"repeat_last_n must be an integer >= 0 (got {self.repeat_last_n!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must be non-empty strings")
        for flag in ("ignore_eos", "deterministic"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} must be true or false (got {getattr(self, flag)!r})")
        if self.seed is not None and (not _integer(self.seed) or self.seed < 0):
            problems.append(f"seed must be an integer >= 0 (got {self.seed!r})")
        if problems:
            raise InvalidRequestError("invalid sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def merged(self, overrides: Mapping[str, Any]) -> Sampling:
        """A copy with ``overrides`` applied; unknown names are an error, not silently ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is not a token count


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose KV state was reused, not evaluated

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, repr=False)
class Timings(Rendered):
    """Where a request's time went, in milliseconds.

    ``ttft_ms`` runs from the call to the first token. The first token comes from the prompt's
    logits, so the decode phase runs from the first token to the last and covers
    ``decode_tokens = completion_tokens - 1`` decode steps (llama.cpp counts them the same way).
    """

    load_ms: float = 0.0  # how long loading the serving model took
    prompt_eval_ms: float = 0.0  # evaluating the prompt tokens not already cached
    prompt_eval_tokens: int = 0  # those tokens
    ttft_ms: float = 0.0  # from the call to the first token
    decode_ms: float = 0.0  # from the first token to the last
    decode_tokens: int = 0  # decode steps: completion_tokens - 1
    total_ms: float = 0.0  # the whole call
    draft_tokens: int = 0  # prompt-lookup draft tokens verified (speculative decoding)
    accepted_tokens: int = 0  # of those, the ones the model's own pick confirmed

    _renderer = TIMINGS

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_eval_tokens / self.prompt_eval_ms * 1e3 if self.prompt_eval_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_ms * 1e3 if self.decode_ms else 0.0


@dataclass(frozen=True, repr=False)
class Completion(Rendered):
    """A finished request. In Jupyter it shows its text, tool calls and a timings table."""

    _renderer = COMPLETION

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    parsed: Any = None  # the validated value of a request with response_schema=

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parsed"] = _jsonable(self.parsed)
        data["usage"]["total_tokens"] = self.usage.total_tokens
        data["timings"]["prompt_tokens_per_s"] = self.timings.prompt_tokens_per_s
        data["timings"]["decode_tokens_per_s"] = self.timings.decode_tokens_per_s
        return data


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text. The last chunk has ``finish_reason`` and the whole ``completion``."""

    text: str
    finish_reason: FinishReason | None = None
    completion: Completion | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Request:
    """One generation request as a backend sees it: a raw prompt or a chat, never both."""

    sampling: Sampling
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    response_schema: ResponseSchema | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("a request needs exactly one of prompt or messages")
        if self.tools and self.messages is None:
            raise InvalidRequestError("tools need a chat request (messages), not a raw prompt")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidRequestError(f"prompt must be text, got {type(self.prompt).__name__}")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"tool names must be unique (got {', '.join(names)})")
        if self.response_schema is not None and self.tool_choice.mode in ("required", "named"):
            raise InvalidRequestError("response_schema and a required tool call exclude each "
                                      "other: ask for one or the other")

    @property
    def calls_tools(self) -> bool:
        """Whether the model is offered tools for this request."""
        return bool(self.tools) and self.tool_choice.mode != "none"

    @classmethod
    def build(cls, sampling: Sampling, prompt: str | None = None,
              messages: tuple[Message, ...] | None = None, *, tools: Sequence[Any] | None = None,
              tool_choice: Any = None, parallel_tool_calls: bool = True,
              response_schema: Any = None) -> Request:
        """A request from the loose forms callers use (tool dicts, functions, schema types)."""
        coerced = tuple(Tool.coerce(t) for t in tools or ())
        return cls(sampling=sampling, prompt=prompt, messages=messages, tools=coerced,
                   tool_choice=ToolChoice.coerce(tool_choice, coerced),
                   parallel_tool_calls=bool(parallel_tool_calls),
                   response_schema=ResponseSchema.coerce(response_schema))


@dataclass(frozen=True)
class ResponseSchema:
    """What a structured answer must be: its JSON schema, and the Python type to build from it
    (a dataclass, TypedDict or pydantic model; ``None`` for a plain schema dict)."""

    schema: Mapping[str, Any]
    target: Any = None
    name: str = "response"

    @classmethod
    def coerce(cls, value: Any) -> ResponseSchema | None:
        if value is None or isinstance(value, ResponseSchema):
            return value
        from .schema import schema_of

        schema = schema_of(value)
        target = None if isinstance(value, Mapping) else value
        name = getattr(value, "__name__", None) or str(schema.get("title") or "response")
        return cls(schema=schema, target=target, name=re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64])

    def parse(self, text: str) -> Any:
        """The answer's value: JSON-decoded, validated, built into ``target``."""
        from .schema import convert, validate

        try:
            value = json.loads(text)
        except ValueError as exc:
            raise OutputParseError(f"the answer for {self.name} is not valid JSON ({exc.msg} at "
                                   f"character {exc.pos})") from exc
        validate(value, self.schema, what=self.name)
        return value if self.target is None else convert(value, self.target)


PromptOrMessages = str | Sequence[Message | Mapping[str, Any]]


ToolsArg = Sequence[Tool | Mapping[str, Any] | Any] | None


@runtime_checkable
class Generator(Protocol):
    """What every backend offers. ``stream`` yields chunks; ``complete``/``chat`` drain it;
    ``acomplete``/``achat``/``astream`` are the same for asyncio code.

    Options (``max_tokens=``, ``temperature=``, ...) override the generator's defaults one by
    one; an option left out (or ``None``) keeps the role's or model's default.
    """

    name: str

    def complete(self, prompt: str, sampling: Sampling | None = None, **options: Any) -> Completion: ...

    def chat(self, messages: Sequence[Message | Mapping[str, Any]], sampling: Sampling | None = None,
             *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
             **options: Any) -> Completion: ...

    def stream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
               *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
               **options: Any) -> Iterator[Chunk]: ...

    async def acomplete(self, prompt: str, sampling: Sampling | None = None,
                        **options: Any) -> Completion: ...

    async def achat(self, messages: Sequence[Message | Mapping[str, Any]],
                    sampling: Sampling | None = None, *, tools: ToolsArg = None,
                    tool_choice: Any = None, response_schema: Any = None,
                    **options: Any) -> Completion: ...

    def astream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
                *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
                **options: Any) -> AsyncIterator[Chunk]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Generator: ...

    def __exit__(self, *exc: object) -> None: ...
