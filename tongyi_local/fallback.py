"""Primary -> secondary routing with logged decisions, and the per-role privacy rule.

    FallbackGenerator(primary, secondary, *, role=None, privacy=None, name=None,
                      fallback_on=FALLBACK_ON, reload_after_s=60.0)
    enforce_privacy(generator, privacy, role) -> generator

``primary`` and ``secondary`` are generators or zero-argument factories (built on first use, so a
local model that fails to load falls back; a failed load is not retried for ``reload_after_s``).
The request goes to the secondary when the primary fails with one of ``fallback_on``: a load
failure (``ModelError``, ``BackendUnavailableError``), a connection error, a timeout or overload
(``RateLimitError``, ``ServerError``). Invalid requests and rejected keys surface: the secondary
would fail the same way, or the configuration needs fixing. A stream that already yielded text
never switches mid-answer: the error surfaces. ``complete``/``chat`` may switch at any point,
since their caller has seen nothing yet.

``privacy="local-only"`` forbids remote backends for the role whatever the fallback says: a remote
generator (``remote`` attribute true, or missing: unknown counts as remote) is refused with a
``PrivacyError`` instead of receiving the request.

Every decision (fallback, blocked by privacy, surfaced mid-stream) is logged on
``tongyi_local.fallback`` as a structured record (role, from, to, reason, latency) in
``record.fallback`` and kept in ``decisions``; it never holds prompt or output text, nor error
messages (which may echo a server's words) - only the error's class and HTTP status.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import telemetry
from .errors import (BackendUnavailableError, ConfigError, ModelError,
                     PrivacyError, RateLimitError, RemoteConnectionError, RemoteTimeoutError,
                     ServerError)
from .backends.aio import AsyncMixin
from .backends.base import Closable
from .types import Chunk, Completion, Generator, Message, PromptOrMessages, Sampling

log = logging.getLogger("tongyi_local.fallback")

LOCAL_ONLY = "local-only"
PRIVACY_VALUES = (None, "any", LOCAL_ONLY)
FALLBACK_ON: tuple[type[BaseException], ...] = (
    ModelError, BackendUnavailableError, RemoteConnectionError, RemoteTimeoutError,
    RateLimitError, ServerError)


@dataclass(frozen=True)
class FallbackDecision:
    """One routing decision; ``action`` is ``fallback``, ``blocked`` or ``surfaced``."""

    action: str
    role: str | None
    source: str
    target: str | None
    reason: str
    latency_ms: float

    def as_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"], data["to"] = data.pop("source"), data.pop("target")
        return data


def check_privacy(privacy: str | None) -> str | None:
    if privacy not in PRIVACY_VALUES:
        raise ConfigError(f"privacy must be one of {', '.join(repr(p) for p in PRIVACY_VALUES)}"
                          f" (got {privacy!r})")
    return privacy


def is_remote(generator: object) -> bool:
    """A generator without a ``remote`` attribute counts as remote: privacy fails closed."""
    return bool(getattr(generator, "remote", True))


def enforce_privacy(generator: Generator, privacy: str | None,
                    role: str | None = None) -> Generator:
    """Return ``generator`` if ``privacy`` allows it for ``role``, else raise ``PrivacyError``.

    A ``FallbackGenerator`` takes the rule over: its remote routes are refused at call time.
    """
    if check_privacy(privacy) != LOCAL_ONLY:
        return generator
    if isinstance(generator, FallbackGenerator):
        generator.role = generator.role or role
        generator.privacy = LOCAL_ONLY
        built = generator._primary.peek()
        if built is not None:
            generator._allowed(built)
        return generator
    if is_remote(generator):
        name = getattr(generator, "name", type(generator).__name__)
        raise PrivacyError(_privacy_message(role, str(name)))
    return generator


def _privacy_message(role: str | None, name: str) -> str:
    who = f"role {role!r}" if role else "this role"
    return (f"{who} is local-only, but {name} is a remote backend; the request was not sent. "
            f"Give the role a local model, or drop privacy = \"local-only\" if the data may "
            f"leave this machine")


def _reason(error: BaseException) -> str:
    status = getattr(error, "status", None)
    return f"{type(error).__name__}({status})" if status else type(error).__name__


class _Slot:
    """A generator, or a factory building it once on first use (failures remembered a while)."""

    def __init__(self, value: Any, label: str, reload_after_s: float) -> None:
        if not isinstance(value, type) and hasattr(value, "stream") and hasattr(value, "complete"):
            self._gen: Any = value
            self._factory: Callable[[], Any] | None = None
        elif callable(value):
            self._gen, self._factory = None, value
        else:
            raise ConfigError(f"the {label} must be a generator or a zero-argument factory, "
                              f"got {type(value).__name__}")
        self.label = label
        self.reload_after_s = reload_after_s
        self._failed: tuple[float, BaseException] | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        if self._gen is not None:
            return str(getattr(self._gen, "name", type(self._gen).__name__))
        return str(getattr(self._factory, "name", None) or getattr(self._factory, "__name__", "")
                   or self.label).replace("<lambda>", self.label)

    def peek(self) -> Any:
        return self._gen

    def get(self) -> Any:
        if self._gen is not None:
            return self._gen
        with self._lock:
            if self._gen is None:
                if self._failed and time.monotonic() - self._failed[0] < self.reload_after_s:
                    raise self._failed[1]
                try:
                    self._gen = self._factory()  # type: ignore[misc]
                    self._failed = None
                except Exception as e:  # Ctrl-C and the like are not a failed load
                    self._failed = (time.monotonic(), e)
                    raise
        return self._gen

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()


class FallbackGenerator(Closable, AsyncMixin):
    """A Generator that answers from ``primary`` and falls back to ``secondary`` on failure.

    Each request gets a telemetry span of its own (the role's), with the routes' model spans
    nested in it and each decision an event on it."""

    backend = "fallback"
    telemetry_leaf = False

    def __init__(self, primary: Any, secondary: Any, *, role: str | None = None,
                 privacy: str | None = None, name: str | None = None,
                 fallback_on: Sequence[type[BaseException]] = FALLBACK_ON,
                 reload_after_s: float = 60.0) -> None:
        self._primary = _Slot(primary, "primary", reload_after_s)
        self._secondary = _Slot(secondary, "secondary", reload_after_s)
        self.role = role
        self.privacy = check_privacy(privacy)
        self.fallback_on = tuple(fallback_on)
        self.name = name or f"{self._primary.name}->{self._secondary.name}"
        self.decisions: collections.deque[FallbackDecision] = collections.deque(maxlen=100)
        if self.privacy == LOCAL_ONLY and self._primary.peek() is not None:
            self._allowed(self._primary.peek())

    @property
    def role_name(self) -> str | None:
        return self.role

    @property
    def remote(self) -> bool:
        """Whether a request may leave this machine (unbuilt factories count as maybe-remote)."""
        if self.privacy == LOCAL_ONLY:
            return False
        return any(slot.peek() is None or is_remote(slot.peek())
                   for slot in (self._primary, self._secondary))

    # --- the Generator protocol --------------------------------------------------------------
    def complete(self, prompt: str, sampling: Sampling | None = None, **options: Any) -> Completion:
        return self._call(lambda g: g.complete(prompt, sampling, **options), "text_completion")

    def chat(self, messages: Sequence[Message | Mapping[str, Any]], sampling: Sampling | None = None,
             *, tools: Sequence[Mapping[str, Any]] | None = None, **options: Any) -> Completion:
        extra = {"tools": tools} if tools is not None else {}
        return self._call(lambda g: g.chat(messages, sampling, **extra, **options), "chat")

    def stream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
               *, tools: Sequence[Mapping[str, Any]] | None = None,
               **options: Any) -> Iterator[Chunk]:
        with telemetry.start(self, None, operation=telemetry.operation_of(prompt_or_messages),
                             stream=True) as call:
            return call.watch(self._stream(prompt_or_messages, sampling, tools, options))

    def _stream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None,
                tools: Sequence[Mapping[str, Any]] | None,
                options: Mapping[str, Any]) -> Iterator[Chunk]:
        extra = {"tools": tools} if tools is not None else {}

        def open_stream(g: Any) -> Iterator[Chunk]:
            return iter(g.stream(prompt_or_messages, sampling, **extra, **options))

        start = time.perf_counter()
        self._check_open()
        try:
            primary = self._allowed(self._primary.get())
            source = open_stream(primary)
        except self.fallback_on as error:
            return open_stream(self._switch(error, start))
        return self._guarded(source, open_stream, start)

    def health(self) -> bool:
        """True if a route the rules allow answers; an unbuilt lazy primary is not loaded for it."""
        for slot in (self._primary, self._secondary):
            gen = slot.peek()
            if gen is None and slot is self._secondary:
                try:
                    gen = slot.get()  # building a remote client sends nothing
                except Exception:  # noqa: BLE001 - a health check answers, it does not raise
                    continue
            if gen is None or (self.privacy == LOCAL_ONLY and is_remote(gen)):
                continue
            check = getattr(gen, "health", None)
            if check is None or check():
                return True
        return False

    def _release(self) -> None:
        self._primary.close()
        self._secondary.close()

    # --- routing -----------------------------------------------------------------------------
    def _call(self, invoke: Callable[[Any], Completion], operation: str) -> Completion:
        with telemetry.start(self, None, operation=operation) as call:
            completion = self._route(invoke)
            call.finish(completion)
        return completion

    def _route(self, invoke: Callable[[Any], Completion]) -> Completion:
        start = time.perf_counter()
        self._check_open()
        try:
            return invoke(self._allowed(self._primary.get()))
        except self.fallback_on as error:
            return invoke(self._switch(error, start))

    def _guarded(self, source: Iterator[Chunk], reopen: Callable[[Any], Iterator[Chunk]],
                 start: float) -> Iterator[Chunk]:
        got_text = False
        try:
            for chunk in source:
                got_text = got_text or bool(chunk.text)
                yield chunk
            return
        except self.fallback_on as error:
            if got_text:
                self._record("surfaced", self._primary.name, None, error, start)
                raise
            close = getattr(source, "close", None)
            if close is not None:
                close()
            secondary = self._switch(error, start)
        yield from reopen(secondary)

    def _allowed(self, gen: Any) -> Any:
        if self.privacy == LOCAL_ONLY and is_remote(gen):
            raise PrivacyError(_privacy_message(self.role, str(getattr(gen, "name", "?"))))
        return gen

    def _switch(self, error: BaseException, start: float) -> Any:
        """The secondary for a request the primary failed, unless privacy forbids it."""
        secondary = self._secondary.get()
        if self.privacy == LOCAL_ONLY and is_remote(secondary):
            self._record("blocked", self._primary.name, self._secondary.name, error, start)
            raise PrivacyError(
                f"{self._primary.name} failed ({_reason(error)}) and the fallback "
                f"{self._secondary.name} is remote, which {self.role or 'this role'!r}'s "
                f"local-only privacy forbids; fix the local model") from error
        self._record("fallback", self._primary.name, self._secondary.name, error, start)
        return secondary

    def _record(self, action: str, source: str, target: str | None, error: BaseException,
                start: float) -> None:
        decision = FallbackDecision(action=action, role=self.role, source=source, target=target,
                                    reason=_reason(error),
                                    latency_ms=round((time.perf_counter() - start) * 1e3, 1))
        self.decisions.append(decision)
        log.warning("fallback %s: role=%s from=%s to=%s reason=%s latency_ms=%.1f", action,
                    decision.role, decision.source, decision.target, decision.reason,
                    decision.latency_ms, extra={"fallback": decision.as_record()})
        telemetry.fallback_decision(action, decision.role, source, target, decision.reason,
                                    decision.latency_ms)
