"""A scripted generator for your own tests: it answers from a list and records what it was asked.

    FakeGenerator(replies=(), *, name="fake", default=None, remote=False, healthy=True,
                  sampling=None)

Each call consumes the next reply; when the script runs out, ``default`` (a reply) answers every
further call, or, without one, the call fails with a ``BackendError`` saying how many calls came.
A reply is any of:

- ``"text"`` - streamed word by word;
- ``FakeReply(text=..., chunks=[...], tool_calls=[...], finish_reason=..., error=...,
  error_after=n, delay_s=...)`` - explicit pieces, tool calls, an error raised at the start or
  after ``n`` chunks (a mid-stream failure);
- an exception instance or class - raised when the call starts;
- a mapping of ``FakeReply`` fields (as models.toml can write it), where ``error`` may name an
  error class of ``tongyi_local.errors``: ``{"error": "RemoteTimeoutError", "message": "..."}``.

``calls`` holds every ``Request`` received (prompt or messages, sampling, tools), in order.
Why shipped in the library: code built on the Generator protocol needs a deterministic stand-in
(httpx ships ``MockTransport`` for the same reason). ``remote=True`` makes it count as a remote
backend for privacy rules.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import errors as _errors
from ..errors import BackendError, ConfigError
from ..types import Chunk, Completion, FinishReason, Request, Sampling, Timings, ToolCall, Usage
from .base import BaseGenerator
from .remote import coerce_sampling


@dataclass(frozen=True)
class FakeReply:
    """One scripted answer. ``chunks`` overrides how ``text`` is split into streamed pieces."""

    text: str = ""
    chunks: Sequence[str] | None = None
    tool_calls: Sequence[ToolCall | Mapping[str, Any]] = ()
    finish_reason: FinishReason | None = None
    error: BaseException | type[BaseException] | str | None = None
    error_after: int | None = None  # raise ``error`` after this many chunks instead of at once
    message: str = "scripted failure"  # message for an error given by class name
    delay_s: float = 0.0  # before the first chunk (simulated latency)
    pieces: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        pieces = tuple(self.chunks) if self.chunks is not None else _words(self.text)
        object.__setattr__(self, "pieces", pieces)
        if self.chunks is not None and not self.text:
            object.__setattr__(self, "text", "".join(pieces))
        calls = tuple(c if isinstance(c, ToolCall) else
                      ToolCall(id=str(c.get("id") or f"call_{i}"), name=str(c["name"]),
                               arguments=c.get("arguments") or {})
                      for i, c in enumerate(self.tool_calls))
        object.__setattr__(self, "tool_calls", calls)

    @classmethod
    def coerce(cls, value: Any) -> FakeReply:
        if isinstance(value, FakeReply):
            return value
        if isinstance(value, str):
            return cls(text=value)
        if isinstance(value, BaseException) or (isinstance(value, type)
                                                 and issubclass(value, BaseException)):
            return cls(error=value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f for f in cls.__dataclass_fields__ if f != "pieces"})
            if unknown:
                raise ConfigError(f"unknown fake reply field(s) {', '.join(unknown)}")
            return cls(**value)
        raise ConfigError(f"a fake reply is text, a FakeReply, an exception or a mapping; "
                          f"got {type(value).__name__}")

    def raise_error(self, backend: str) -> None:
        error = self.error
        if isinstance(error, str):
            cls = getattr(_errors, error, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                raise ConfigError(
                    f"fake reply error {error!r} is not a class in tongyi_local.errors")
            error = cls
        if isinstance(error, type):
            try:
                error = (error(self.message, backend=backend)
                         if issubclass(error, _errors.RemoteError) else error(self.message))
            except TypeError:  # e.g. ModelLoadError(path, reason)
                error = error(backend, self.message)
        assert isinstance(error, BaseException)
        raise error


class FakeGenerator(BaseGenerator):
    """Answers from a script; ``calls`` records every request."""

    backend = "fake"

    def __init__(self, replies: Iterable[Any] = (), *, name: str = "fake", default: Any = None,
                 remote: bool = False, healthy: bool = True,
                 sampling: Sampling | Mapping[str, Any] | None = None) -> None:
        self._replies = [FakeReply.coerce(r) for r in replies]
        self._default = FakeReply.coerce(default) if default is not None else None
        self._lock = threading.Lock()
        self.calls: list[Request] = []
        self.name = name
        self.remote = bool(remote)
        self.healthy = healthy
        sampling_default = coerce_sampling(sampling)
        if sampling_default is not None:
            self.default_sampling = sampling_default

    def add(self, *replies: Any) -> None:
        """Append replies to the script."""
        with self._lock:
            self._replies.extend(FakeReply.coerce(r) for r in replies)

    def health(self) -> bool:
        return bool(self.healthy) and not self._closed

    def _generate(self, request: Request) -> Iterator[Chunk]:
        with self._lock:
            self.calls.append(request)
            if self._replies:
                reply = self._replies.pop(0)
            elif self._default is not None:
                reply = self._default
            else:
                raise BackendError(f"{self.name}: no scripted reply left for call "
                                   f"{len(self.calls)}; add replies or pass default=")
        return self._play(reply, request)

    def _play(self, reply: FakeReply, request: Request) -> Iterator[Chunk]:
        start = time.perf_counter()
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.error is not None and reply.error_after is None:
            reply.raise_error(self.name)
        pieces = reply.pieces[:request.sampling.max_tokens]
        first = None
        for i, piece in enumerate(pieces):
            if reply.error is not None and i == reply.error_after:
                reply.raise_error(self.name)
            first = first if first is not None else time.perf_counter()
            yield Chunk(piece)
        if reply.error is not None:  # error_after >= number of pieces
            reply.raise_error(self.name)
        end = time.perf_counter()
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else
                                         "length" if len(pieces) < len(reply.pieces) else "stop")
        prompt = request.prompt if request.prompt is not None else " ".join(
            m.content for m in request.messages or ())
        first = first if first is not None else end
        timings = Timings(prompt_eval_tokens=len(prompt.split()), ttft_ms=(first - start) * 1e3,
                          decode_ms=(end - first) * 1e3, decode_tokens=max(len(pieces) - 1, 0),
                          total_ms=(end - start) * 1e3)
        completion = Completion(text="".join(pieces), finish_reason=finish,
                                usage=Usage(len(prompt.split()), len(pieces)), timings=timings,
                                model=self.name, tool_calls=tuple(reply.tool_calls))
        yield Chunk("", finish_reason=finish, completion=completion)


def _words(text: str) -> tuple[str, ...]:
    """Split keeping the spaces, so the pieces join back to the text exactly."""
    pieces: list[str] = []
    for word in text.split(" "):
        pieces.append(word if not pieces else " " + word)
    return tuple(p for p in pieces if p)

