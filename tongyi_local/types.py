"""The Generator protocol and the typed values that cross it.

Why: agent code must not care whether a role runs on the local llama.cpp, DashScope or an
OpenAI-compatible server, so every backend speaks these types. Results carry usage and timings as
typed fields (Ollama returns the same figures as loose JSON keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import InvalidRequestError

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for; ``arguments`` is the JSON text the model produced."""

    id: str
    name: str
    arguments: str


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
            calls = tuple(
                ToolCall(id=c.get("id", ""), name=c["function"]["name"],
                         arguments=c["function"].get("arguments", "{}"))
                for c in value.get("tool_calls") or ())
            return cls(role=value["role"], content=value.get("content") or "",
                       tool_calls=calls, tool_call_id=value.get("tool_call_id"))
        raise InvalidRequestError(
            "each message must be a Message or a mapping with 'role' and 'content'")


def coerce_messages(messages: Sequence[Message | Mapping[str, Any]]) -> tuple[Message, ...]:
    if isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of messages")
    return tuple(Message.coerce(m) for m in messages)


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. ``temperature=0`` is greedy (deterministic).

    ``seed`` makes temperature sampling repeatable for the same prompt and model state; reusing a
    cached prompt prefix evaluates the prompt in other batch splits, which can change low-order
    bits of the logits (as with llama-server's cache_prompt). Validated on construction, so a bad
    value fails before any work is done.
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r}); 0 is greedy")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r}); 0 disables it")
        if not _finite(self.min_p) or not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (got {self.min_p!r})")
        if not _finite(self.repeat_penalty) or self.repeat_penalty <= 0:
            problems.append(f"repeat_penalty must be > 0 (got {self.repeat_penalty!r}); 1 disables it")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            problems.append(f"repeat_last_n must be an integer >= 0 (got {self.repeat_last_n!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must be non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
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


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in milliseconds.

    ``ttft_ms`` runs from the call to the first token. The first token comes from the prompt's
    logits, so the decode phase runs from the first token to the last and covers
    ``decode_tokens = completion_tokens - 1`` decode steps (llama.cpp counts them the same way).
    """

    load_ms: float = 0.0
    prompt_eval_ms: float = 0.0
    prompt_eval_tokens: int = 0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens: int = 0
    total_ms: float = 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_eval_tokens / self.prompt_eval_ms * 1e3 if self.prompt_eval_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_ms * 1e3 if self.decode_ms else 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["usage"]["total_tokens"] = self.usage.total_tokens
        data["timings"]["prompt_tokens_per_s"] = self.timings.prompt_tokens_per_s
        data["timings"]["decode_tokens_per_s"] = self.timings.decode_tokens_per_s
        return data


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
    tools: tuple[Mapping[str, Any], ...] = ()  # OpenAI-style {"type": "function", "function": {...}}

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("a request needs exactly one of prompt or messages")
        if self.tools and self.messages is None:
            raise InvalidRequestError("tools need a chat request (messages), not a raw prompt")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidRequestError(f"prompt must be text, got {type(self.prompt).__name__}")


PromptOrMessages = str | Sequence[Message | Mapping[str, Any]]


@runtime_checkable
class Generator(Protocol):
    """What every backend offers. ``stream`` yields chunks; ``complete``/``chat`` drain it."""

    name: str

    def complete(self, prompt: str, sampling: Sampling | None = None, **options: Any) -> Completion: ...

    def chat(self, messages: Sequence[Message | Mapping[str, Any]], sampling: Sampling | None = None,
             *, tools: Sequence[Mapping[str, Any]] | None = None, **options: Any) -> Completion: ...

    def stream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
               *, tools: Sequence[Mapping[str, Any]] | None = None,
               **options: Any) -> Iterator[Chunk]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Generator: ...

    def __exit__(self, *exc: object) -> None: ...
