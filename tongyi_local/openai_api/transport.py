"""httpx transports that hand OpenAI API requests to ``OpenAIApp`` in this process.

Why a transport and not a server: code written against the official ``openai`` SDK (or a
framework on top of it) then runs on local models with one changed argument and no port, no
process, no serialization beyond what the SDK itself does::

    client = openai.OpenAI(base_url="http://tongyi-local/v1", api_key="local",
                           http_client=httpx.Client(transport=tongyi_local.openai_transport()))

Closing a streamed response (or dropping it) closes the request and frees its slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx

from .app import OpenAIApp, Reply


class _Events(httpx.SyncByteStream):
    def __init__(self, events: Iterator[bytes]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[bytes]:
        yield from self._events

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


class _AsyncEvents(httpx.AsyncByteStream):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            yield event

    async def aclose(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


def _headers(reply: Reply) -> dict[str, str]:
    return {"content-type": reply.content_type}


class OpenAITransport(httpx.BaseTransport):
    """Synchronous: for ``httpx.Client`` / ``openai.OpenAI``."""

    def __init__(self, app: OpenAIApp) -> None:
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        reply = self.app.handle(request.method, request.url.path, request.read())
        if reply.events is not None:
            return httpx.Response(reply.status, headers=_headers(reply),
                                  stream=_Events(reply.events), request=request)
        return httpx.Response(reply.status, headers=_headers(reply), content=reply.body,
                              request=request)

    def close(self) -> None:
        self.app.close()


class AsyncOpenAITransport(httpx.AsyncBaseTransport):
    """Asynchronous: for ``httpx.AsyncClient`` / ``openai.AsyncOpenAI``."""

    def __init__(self, app: OpenAIApp) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        reply = await self.app.ahandle(request.method, request.url.path, await request.aread())
        if reply.aevents is not None:
            return httpx.Response(reply.status, headers=_headers(reply),
                                  stream=_AsyncEvents(reply.aevents), request=request)
        return httpx.Response(reply.status, headers=_headers(reply), content=reply.body,
                              request=request)

    async def aclose(self) -> None:
        self.app.close()
