"""The OpenAI REST API answered by the library itself: routes, model lookup, errors.

Why one application object under two faces: the in-process httpx transport and the HTTP server
(``tongyi-local serve``) must answer exactly alike, so both hand a method, a path and a body to
``OpenAIApp`` and send back the ``Reply`` it makes (``handle`` for synchronous callers,
``ahandle`` for asyncio ones). ``model`` names a role or a model of models.toml, so roles, the
pool, fallback and privacy rules apply as they do to ``for_role``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors as E
from ..config import Config, RoleSpec
from ..types import Chunk, Completion, Generator
from . import wire

log = logging.getLogger("tongyi_local.openai")


@dataclass
class Reply:
    """What goes back: a status and a JSON body, or a stream of server-sent events."""

    status: int
    body: bytes = b""
    events: Iterator[bytes] | None = None
    aevents: AsyncIterator[bytes] | None = None

    @property
    def content_type(self) -> str:
        streaming = self.events is not None or self.aevents is not None
        return "text/event-stream" if streaming else "application/json"

    @classmethod
    def json(cls, value: Mapping[str, Any], status: int = 200) -> Reply:
        return cls(status, json.dumps(value, ensure_ascii=False).encode())


# (error class, HTTP status, OpenAI error type, code); the first match wins.
_ERRORS: tuple[tuple[type[BaseException], int, str, str | None], ...] = (
    (E.ContextOverflowError, 400, "invalid_request_error", "context_length_exceeded"),
    (E.UnsupportedSchemaError, 400, "invalid_request_error", "unsupported_schema"),
    (E.InvalidRequestError, 400, "invalid_request_error", None),
    (E.ConfigError, 400, "invalid_request_error", None),
    (E.PrivacyError, 403, "permission_error", "local_only"),
    (E.RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (E.InsufficientMemoryError, 503, "server_error", "overloaded"),
    (E.ModelNotFoundError, 503, "server_error", "model_not_available"),
    (E.GeneratorClosedError, 503, "server_error", "overloaded"),
    (E.ServerError, 503, "server_error", "upstream_unavailable"),
    (E.RemoteTimeoutError, 504, "server_error", "upstream_timeout"),
    (E.RemoteError, 502, "server_error", "upstream_error"),
    (E.TongyiError, 500, "server_error", None),
)


def error_reply(exc: BaseException) -> Reply:
    """The OpenAI error shape for one of the library's errors (anything else is a 500 that
    names only its type: its text may hold request content)."""
    if isinstance(exc, wire.WireError):
        return Reply.json(error_body(str(exc), exc.type, exc.param, exc.code), exc.status)
    for cls, status, kind, code in _ERRORS:
        if isinstance(exc, cls):
            return Reply.json(error_body(str(exc), kind, None, code), status)
    return Reply.json(error_body(f"internal error ({type(exc).__name__}); see the server log",
                                 "server_error", None, None), 500)


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class _Prepared:
    """A routed call, ready for the sync or the async face to run."""

    call: wire.Call
    generator: Any
    ids: wire.ResponseIds
    events: wire.ChatEvents
    asked: Any
    options: dict[str, Any]

    @property
    def chat(self) -> bool:
        return isinstance(self.call, wire.ChatCall)


class OpenAIApp:
    """Answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``."""

    def __init__(self, config: Config | str | Path | None = None, profile: str | None = None,
                 *, registry: Any = None) -> None:
        from ..registry import Registry, default_registry

        if registry is None:
            shared = default_registry()
            if config is None and profile is None:
                registry = shared
            else:  # its own roles, the process's one pool of loaded models
                registry = Registry(config if isinstance(config, Config) else None,
                                    config_path=None if isinstance(config, Config) else config,
                                    pool=shared.pool, profile=profile)
        self.registry = registry
        self._generators: dict[str, Generator] = {}
        self._lock = threading.Lock()

    # --- lookup ---------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        config = self.registry.config
        return [*config.roles, *(m for m in config.models if m not in config.roles)]

    def generator(self, name: str) -> Generator:
        """The generator ``model`` names: a role (its prompt, sampling, fallback, privacy) or a
        model entry (its own defaults)."""
        with self._lock:
            if name not in self._generators:
                self._generators[name] = self._make(name)
            return self._generators[name]

    def _make(self, name: str) -> Generator:
        from ..registry import RoleGenerator

        config = self.registry.config
        if name in config.roles:
            return self.registry.for_role(name)
        if name in config.models:
            role = RoleSpec(name=name, model=name, defined_in="(model entry)")
            return RoleGenerator(self.registry, role, config.models[name])
        raise wire.UnknownModelError(name, self.model_names())

    # --- routing --------------------------------------------------------------------------
    def _route(self, method: str, path: str) -> Callable[[bytes], Any]:
        path = path.rstrip("/") or "/"
        routes: dict[str, dict[str, Callable[[bytes], Any]]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._text},
            "/v1/models": {"GET": lambda _: self._models()},
            "/health": {"GET": lambda _: self._health()},
        }
        if path.startswith("/v1/models/"):
            routes[path] = {"GET": lambda _: self._model(path.removeprefix("/v1/models/"))}
        if path not in routes:
            raise wire.WireError(f"no route {method} {path}; this server answers "
                                 f"{', '.join(sorted(routes))}", status=404,
                                 code="unknown_url")
        if method not in routes[path]:
            raise wire.WireError(f"{path} takes {', '.join(routes[path])}, not {method}",
                                 status=405, code="method_not_allowed")
        return routes[path][method]

    def _health(self) -> Reply:
        """Liveness plus what is loaded and how many requests each model is serving."""
        return Reply.json({"status": "ok", "models": [
            {"name": m.name, "in_flight": m.in_flight, "memory_bytes": m.memory_bytes}
            for m in self.registry.pool.ps()]})

    def _models(self) -> Reply:
        return Reply.json({"object": "list",
                           "data": [_model_entry(name) for name in self.model_names()]})

    def _model(self, name: str) -> Reply:
        if name not in self.model_names():
            raise wire.UnknownModelError(name, self.model_names())
        return Reply.json(_model_entry(name))

    def _chat(self, body: bytes) -> tuple[wire.ChatCall, Generator]:
        call = wire.chat_call(wire.decode_body(body))
        return call, self.generator(call.model)

    def _text(self, body: bytes) -> tuple[wire.TextCall, Generator]:
        call = wire.text_call(wire.decode_body(body))
        return call, self.generator(call.model)

    # --- answering ------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes) -> Reply:
        """Answer one request on the calling thread (streams are answered as they are read)."""
        started = time.perf_counter()
        try:
            reply = self._dispatch(method, path, body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            reply = _failed(exc)
        _log(method, path, reply.status, started)
        return reply

    async def ahandle(self, method: str, path: str, body: bytes) -> Reply:
        """Answer one request without blocking the event loop."""
        started = time.perf_counter()
        try:
            reply = await self._adispatch(method, path, body)
        except Exception as exc:  # noqa: BLE001
            reply = _failed(exc)
        _log(method, path, reply.status, started)
        return reply

    def _prepare(self, method: str, path: str, body: bytes) -> Reply | _Prepared:
        """The route's answer (a Reply), or the call with its generator and arguments."""
        found = self._route(method, path)(body)
        if isinstance(found, Reply):
            return found
        call, generator = found
        ids, events = _shapes(call)
        asked, options = call.input()
        return _Prepared(call, generator, ids, events, asked, options)

    def _dispatch(self, method: str, path: str, body: bytes) -> Reply:
        p = self._prepare(method, path, body)
        if isinstance(p, Reply):
            return p
        if not p.call.stream:
            answer = p.generator.chat if p.chat else p.generator.complete
            return Reply.json(_body(p.call, answer(p.asked, **p.options), p.ids))
        chunks = p.generator.stream(p.asked, **p.options)
        try:
            first = next(chunks)  # failures before the first token get their own status
        except BaseException:
            _close(chunks)
            raise
        return Reply(200, events=_events(first, chunks, p.events))

    async def _adispatch(self, method: str, path: str, body: bytes) -> Reply:
        p = self._prepare(method, path, body)
        if isinstance(p, Reply):
            return p
        if not p.call.stream:
            answer = p.generator.achat if p.chat else p.generator.acomplete
            return Reply.json(_body(p.call, await answer(p.asked, **p.options), p.ids))
        chunks = p.generator.astream(p.asked, **p.options)
        try:
            first = await chunks.__anext__()
        except BaseException:
            await chunks.aclose()
            raise
        return Reply(200, aevents=_aevents(first, chunks, p.events))

    def close(self) -> None:
        """Drop the generators this app made (the shared pool keeps its loaded models)."""
        with self._lock:
            self._generators.clear()


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tongyi-local"}


def _shapes(call: wire.Call) -> tuple[wire.ResponseIds, wire.ChatEvents]:
    chat = isinstance(call, wire.ChatCall)
    ids = wire.ResponseIds(call.model, "chatcmpl" if chat else "cmpl")
    return ids, (wire.ChatEvents if chat else wire.TextEvents)(ids, call.include_usage)


def _body(call: wire.Call, completion: Completion, ids: wire.ResponseIds) -> dict[str, Any]:
    return (wire.chat_body if isinstance(call, wire.ChatCall) else wire.text_body)(completion,
                                                                                  ids)


def _failed(exc: Exception) -> Reply:
    if not isinstance(exc, E.TongyiError):
        log.exception("unexpected %s while answering a request", type(exc).__name__)
    return error_reply(exc)


def _log(method: str, path: str, status: int, started: float) -> None:
    log.debug("%s %s -> %d in %.1f ms", method, path, status,
              (time.perf_counter() - started) * 1e3)


def _error_event(exc: BaseException) -> bytes:
    if not isinstance(exc, E.TongyiError):
        log.error("unexpected %s in a stream", type(exc).__name__, exc_info=exc)
    reply = error_reply(exc)
    return wire.sse(json.loads(reply.body))


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _events(first: Chunk, chunks: Iterator[Chunk], events: wire.ChatEvents) -> Iterator[bytes]:
    """The stream's events; closing this iterator early closes the request (frees its slot)."""
    try:
        yield from events.opening()
        chunk: Chunk | None = first
        while chunk is not None:
            yield from events.of(chunk)
            if chunk.completion is not None:
                return
            chunk = next(chunks, None)
    except Exception as exc:  # noqa: BLE001 - after the headers, errors travel as an event
        yield _error_event(exc)
    finally:
        _close(chunks)


async def _aevents(first: Chunk, chunks: Any, events: wire.ChatEvents) -> AsyncIterator[bytes]:
    try:
        for event in events.opening():
            yield event
        chunk: Chunk | None = first
        while chunk is not None:
            for event in events.of(chunk):
                yield event
            if chunk.completion is not None:
                return
            chunk = await anext(chunks, None)
    except Exception as exc:  # noqa: BLE001
        yield _error_event(exc)
    finally:
        await chunks.aclose()
