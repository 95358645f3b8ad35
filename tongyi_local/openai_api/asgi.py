"""``OpenAIApp`` as an ASGI application, served by uvicorn for ``tongyi-local serve``.

Why plain ASGI and no web framework: the app has four routes and one body format, so a framework
would add a dependency and a second routing table. A client that disconnects mid-stream has its
request cancelled at once (its slot freed), as a closed in-process stream does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..errors import BackendUnavailableError, ConfigError
from .app import OpenAIApp, Reply, error_body

log = logging.getLogger("tongyi_local.openai")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

OPEN_PATHS = ("/health",)  # answered without the bearer key, for load balancers and probes


class ASGIApp:
    """The OpenAI routes plus ``/health``; with ``api_key`` set, other routes need
    ``Authorization: Bearer <key>``."""

    def __init__(self, app: OpenAIApp, api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if not self._authorized(scope):
            reply = Reply.json(error_body("missing or wrong API key: send 'Authorization: "
                                          "Bearer <key>'", "invalid_request_error", None,
                                          "invalid_api_key"), 401)
        else:
            reply = await self.app.ahandle(scope["method"], scope["path"], body)
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": [(b"content-type", reply.content_type.encode()),
                                (b"cache-control", b"no-cache")]})
        if reply.aevents is None:
            await send({"type": "http.response.body", "body": reply.body})
            return
        await _stream(reply, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.app.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _stream(reply: Reply, receive: Receive, send: Send) -> None:
    """Send the events; a client that goes away cancels the request (and frees its slot)."""
    events = reply.aevents
    assert events is not None

    async def forward() -> None:
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    sender, watcher = asyncio.create_task(forward()), asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            sender.result()
        else:
            log.debug("client disconnected; cancelling its request")
    finally:
        for task in (sender, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


KEY_ENV = "TONGYI_LOCAL_API_KEY"


def server_key(env: str | None) -> str | None:
    """The bearer key from ``env`` (or ``$TONGYI_LOCAL_API_KEY``); a named but empty variable
    is an error, not an open server."""
    name = env or KEY_ENV
    key = os.environ.get(name)
    if env is not None and not key:
        raise ConfigError(f"--api-key-env {env}: the environment variable is not set or empty")
    return key or None


def serve(app: OpenAIApp, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None) -> None:
    """Serve until interrupted (uvicorn, one process: the models live in it)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise BackendUnavailableError("tongyi-local serve needs uvicorn: "
                                      "pip install 'tongyi-local[serve]'") from exc

    uvicorn.run(ASGIApp(app, api_key), host=host, port=port, log_level="warning",
                access_log=False, lifespan="on")
