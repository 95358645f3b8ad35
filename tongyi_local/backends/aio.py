"""The asyncio face of a generator: ``acomplete``, ``achat``, ``astream``.

Why a mixin over ``stream``: it works for any backend whose ``stream`` returns an iterator of
chunks. One worker thread per request walks that iterator and hands chunks to the event loop, so
the loop never blocks on llama.cpp or on a network read, and no backend needs a second (async)
implementation. Cancelling the awaiting task, closing the async iterator or dropping it closes the
sync stream; the local backend's stream closes from any thread and frees its slot at once.
The pump thread runs in a copy of the caller's context, so telemetry spans nest under the
caller's span there too.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import BackendError, OutputParseError
from ..types import (Chunk, Completion, Message, PromptOrMessages, Sampling, ToolsArg,
                     coerce_messages)

_END = object()


class AsyncMixin:
    """Adds acomplete/achat/astream to a class that has the sync ``stream``."""

    def astream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
                *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
                **options: Any) -> AsyncStream:
        """``async for chunk in model.astream(...)``; invalid requests raise here, at once."""
        return AsyncStream(self.stream(prompt_or_messages, sampling, tools=tools,
                                       tool_choice=tool_choice, response_schema=response_schema,
                                       **options))

    async def acomplete(self, prompt: str, sampling: Sampling | None = None,
                        **options: Any) -> Completion:
        return await _drain(self.stream(prompt, sampling, **options))

    async def achat(self, messages: Sequence[Message | Mapping[str, Any]],
                    sampling: Sampling | None = None, *, tools: ToolsArg = None,
                    tool_choice: Any = None, response_schema: Any = None,
                    **options: Any) -> Completion:
        def open_stream() -> Iterator[Chunk]:
            return self.stream(coerce_messages(messages), sampling, tools=tools,
                               tool_choice=tool_choice, response_schema=response_schema,
                               **options)

        try:
            return await _drain(open_stream())
        except OutputParseError:
            demands = response_schema is not None or tool_choice not in (None, "auto", "none")
            if not demands or getattr(self, "guarantees_schema", False):
                raise
            return await _drain(open_stream())  # once more, as the sync chat does


class AsyncStream:
    """Async iterator over a sync chunk iterator, pumped by one daemon thread."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self._queue: asyncio.Queue | None = None
        self._stop = threading.Event()
        self._done = False
        self._finalizer = weakref.finalize(self, _cancel, self._stop, chunks)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            self._queue = asyncio.Queue()
            _start_pump(asyncio.get_running_loop(), self._queue, self._stop, self._chunks)
        try:
            item = await self._queue.get()
        except BaseException:  # the task was cancelled: stop generating now
            await self.aclose()
            raise
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._finalizer()


def _start_pump(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, stop: threading.Event,
                chunks: Iterator[Chunk]) -> None:
    """Walk ``chunks`` on a thread; the closure holds no reference to the AsyncStream, so
    dropping the stream unread still cancels the request."""

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def pump() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                put(chunk)
            else:
                put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            put(exc)
        finally:
            if stop.is_set():
                _close(chunks)

    # the caller's context (its OpenTelemetry span, among others) goes along to the thread
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(pump,), name="tongyi-local-astream",
                     daemon=True).start()


def _cancel(stop: threading.Event, chunks: Iterator[Chunk]) -> None:
    stop.set()
    _close(chunks)


def _close(chunks: Iterator[Chunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        try:
            close()
        except ValueError:  # a plain generator running on the pump thread: closed after its chunk
            pass


async def _drain(chunks: Iterator[Chunk]) -> Completion:
    quiet = getattr(chunks, "quiet", None)  # the local backend can skip per-token hand-overs
    stream = AsyncStream(quiet() if quiet else chunks)
    try:
        async for chunk in stream:
            if chunk.completion is not None:
                return chunk.completion
    finally:
        await stream.aclose()
    raise BackendError("the backend ended a stream without a final result")
