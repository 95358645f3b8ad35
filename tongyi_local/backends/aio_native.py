"""The asyncio face for backends that speak asyncio themselves (the remote ones): no thread.

Why not ``aio.AsyncMixin`` for them: it walks the sync stream on a worker thread, and a remote
stream's worker sits in a blocking socket read, so a cancelled request keeps its connection open
until the next piece arrives (for ever if the server stalls), and every request costs a thread.
A backend that implements ``_agenerate(request)`` (an async iterator of chunks whose last one
carries the ``Completion``) gets ``astream``, ``acomplete`` and ``achat`` here, run on the event
loop: cancelling the awaiting task, ``aclose()`` of the stream or breaking out of ``async for``
closes the HTTP response at once.

How a stream is stopped matters. Cancelling a read in httpx or the DashScope SDK (aiohttp) raises
``CancelledError`` at the innermost await, and it unwinds every nested async generator and
``async with response`` of those libraries in their own frames: the response closes there and
then. ``aclose()`` on an outer async generator instead leaves the libraries' inner generators
to asyncio's finalizer of abandoned async generators, which closes them later, in other tasks,
and collides with the loop's own cleanup when the loop ends. So ``astream`` reads in a task of
its own (``in_task``), and closing the stream cancels that task.

Everything but the I/O is the sync path's: the request is built by ``BaseGenerator._request``,
an answer to a ``response_schema`` or a required tool call is checked by ``base.with_checked``
and asked for once more when it fails, as ``base.drain_retrying`` does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Generic, TypeVar

from .. import telemetry
from ..errors import BackendError, OutputParseError
from ..types import (Chunk, Completion, Message, PromptOrMessages, Request,
                     Sampling, ToolsArg, coerce_messages)
from .base import with_checked

log = logging.getLogger("tongyi_local")
C = TypeVar("C")


class NativeAsync:
    """Mixin, listed before ``BaseGenerator``: replaces the thread-pumped async methods.

    The backend provides ``_agenerate(request)`` and ``_aclients`` (a ``PerLoop`` of its async
    HTTP client, which ``aclose()`` closes on the running loop).
    """

    _aclients: PerLoop[Any]

    def _agenerate(self, request: Request) -> AsyncIterator[Chunk]:
        raise NotImplementedError

    def astream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
                *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
                **options: Any) -> AsyncIterator[Chunk]:
        """``async for chunk in model.astream(...)``; invalid requests raise here, at once."""
        prompt, messages = ((prompt_or_messages, None) if isinstance(prompt_or_messages, str)
                            else (None, coerce_messages(prompt_or_messages)))
        request = self._request(prompt, messages, sampling, options, tools=tools,
                                tool_choice=tool_choice, response_schema=response_schema)
        return self._astream(request)

    async def acomplete(self, prompt: str, sampling: Sampling | None = None,
                        **options: Any) -> Completion:
        return await self._acomplete(self._request(prompt, None, sampling, options))

    async def achat(self, messages: Sequence[Message | Mapping[str, Any]],
                    sampling: Sampling | None = None, *, tools: ToolsArg = None,
                    tool_choice: Any = None, response_schema: Any = None,
                    **options: Any) -> Completion:
        request = self._request(None, coerce_messages(messages), sampling, options, tools=tools,
                                tool_choice=tool_choice, response_schema=response_schema)
        return await self._acomplete(request)

    async def aclose(self) -> None:
        """``close()``, having first closed this loop's client on the loop itself (``close()``
        from inside a running loop can only schedule that)."""
        await self._aclients.aclose_current()
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- helpers ----------------------------------------------------------------------------
    def _aopen(self, request: Request) -> AsyncIterator[Chunk]:
        """The request's chunks, parsed against its schema when decoding does not enforce it.
        Errors in the request (a missing key, an empty prompt) raise here, before any I/O."""
        chunks = self._agenerate(request)
        return achecked(chunks, request, self.name) if self._checks(request) else chunks

    def _astream(self, request: Request) -> AsyncIterator[Chunk]:
        chunks = self._aopen(request)
        if telemetry.enabled():
            chunks = telemetry.traced_async(self, request, chunks)
        return in_task(chunks)

    async def _acomplete(self, request: Request) -> Completion:
        """The answer, under the request's telemetry span (ended as cancelled when the task is)."""
        with telemetry.start(self, request) as call:
            completion = await self._adrain_retrying(request)
            call.finish(completion)
        return completion

    async def _adrain_retrying(self, request: Request) -> Completion:
        """Drain the stream in the caller's task (cancelling it cancels the read directly); an
        answer that fails its schema is asked for once more, as the sync ``chat`` does."""
        try:
            return await adrain(self._aopen(request))
        except OutputParseError as exc:
            if not self._checks(request):
                raise
            log.info("%s: the answer did not meet the request (%s); asking once more",
                     self.name, type(exc).__name__)
            return await adrain(self._aopen(request))


async def achecked(chunks: AsyncIterator[Chunk], request: Request,
                   model: str) -> AsyncIterator[Chunk]:
    """The async stream with its final completion checked, by the sync check step."""
    async with aclosing(chunks):
        async for chunk in chunks:
            for checked in with_checked((chunk,), request, model):
                yield checked


_END = object()


class _Failed:
    """An exception the reader task hands to the consumer, to be raised there."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def in_task(items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``items``, read by a task of its own on this loop and handed over by a queue; closing
    this stream (``aclose()``, a ``break`` whose stream is then dropped, the consumer's task
    cancelled) cancels that task and waits for it, so the read unwinds where it is.

    The queue is unbounded on purpose: the reader then only ever waits inside ``items`` (on the
    network or a retry's sleep), which is where a cancellation must land; a full queue would
    park it in its own ``put`` instead. The task starts on the first ``__anext__``.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()
    reader = asyncio.get_running_loop().create_task(_read(items, queue),
                                                    name="tongyi-local-aread")
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait({reader})


async def _read(items: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
    try:
        async for item in items:
            queue.put_nowait(item)
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, who raises it
        queue.put_nowait(_Failed(exc))
    else:
        queue.put_nowait(_END)


async def adrain(chunks: AsyncIterator[Chunk]) -> Completion:
    """The final completion; the stream is closed on the way out, whatever happens."""
    async with aclosing(chunks):
        async for chunk in chunks:
            if chunk.completion is not None:
                return chunk.completion
    raise BackendError("the backend ended a stream without a final result")


class PerLoop(Generic[C]):
    """One async client per event loop: made on first use there, closed on that loop when it
    shuts down, or by ``aclose_current()`` / ``close_all()``.

    Why: an ``httpx.AsyncClient`` or ``aiohttp.ClientSession`` keeps connections bound to the
    loop that opened them, and a second ``asyncio.run()`` runs a new loop that must not touch
    them. asyncio closes every live async generator in ``loop.shutdown_asyncgens()`` (the last
    step of ``asyncio.run``), so a keeper generator parked on each loop closes that loop's
    client there, on its own loop, with nothing left open behind.
    """

    def __init__(self, make: Callable[[], C], close: Callable[[C], Awaitable[object]]) -> None:
        self._make = make
        self._close = close
        self._lock = threading.Lock()  # loops in several threads may share one generator
        self._entries: dict[asyncio.AbstractEventLoop, tuple[C, Any]] = {}
        self._closing: set[asyncio.Future[Any]] = set()

    async def get(self) -> C:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entries.get(loop)
            fresh = entry is None
            if fresh:
                self._entries = {k: v for k, v in self._entries.items() if not k.is_closed()}
                client = self._make()
                entry = self._entries[loop] = (client, self._keeper(loop, client))
        if fresh:
            await entry[1].asend(None)  # park the keeper: the loop now knows it, to close it
        return entry[0]

    async def aclose_current(self) -> None:
        with self._lock:
            entry = self._entries.get(asyncio.get_running_loop())
        if entry is not None:
            await entry[1].aclose()

    def close_all(self) -> None:
        """From a sync ``close()``: every live loop closes its own client. This cannot wait for
        a loop, so the closing is scheduled on it (a closed loop's client was closed when the
        loop shut down, or is dropped with it)."""
        with self._lock:
            entries, self._entries = list(self._entries.items()), {}
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, (_, keeper) in entries:
            if loop.is_closed():
                continue
            if loop is running:
                task = loop.create_task(_shut(keeper))
                self._closing.add(task)  # a task nobody references may be collected unfinished
                task.add_done_callback(self._closing.discard)
            else:
                asyncio.run_coroutine_threadsafe(_shut(keeper), loop)

    async def _keeper(self, loop: asyncio.AbstractEventLoop, client: C) -> AsyncIterator[None]:
        try:
            yield
        finally:
            with self._lock:
                if self._entries.get(loop, (None,))[0] is client:
                    del self._entries[loop]
            await self._close(client)


async def _shut(keeper: Any) -> None:
    await keeper.aclose()
