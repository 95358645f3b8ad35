"""Shared front half of every backend: argument handling, draining streams, async, context
management.

A backend implements ``_generate(request)`` (an iterator of chunks whose last one carries the
``Completion``) and ``_release()``; everything the caller touches is here, once. A backend whose
decoding cannot guarantee a ``response_schema`` or a required tool call (``guarantees_schema =
False``: the remote ones) gets the answer checked here, and ``complete``/``chat`` ask once more
when it fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Self

from .. import telemetry
from ..errors import BackendError, GeneratorClosedError, OutputParseError
from ..tool_calls import check_answer
from ..types import (Chunk, Completion, Message, PromptOrMessages, Request, Sampling, ToolsArg,
                     coerce_messages)
from .aio import AsyncMixin

log = logging.getLogger("tongyi_local")
content_log = logging.getLogger("tongyi_local.content")
CONTENT_ENV = "TONGYI_LOCAL_LOG_CONTENT"
_content_announced = False


class Closable:
    """``close()`` once (it calls ``_release()``), ``with`` blocks, and the check every call makes
    first: the lifecycle every generator shares, backends and the fallback wrapper alike."""

    name: str = "generator"
    _closed = False

    def _release(self) -> None:
        """Free the generator's resources; called once by ``close``."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GeneratorClosedError(f"{self.name} is closed; create a new generator")


class BaseGenerator(Closable, AsyncMixin):
    default_sampling: Sampling = Sampling()
    remote: bool = False  # True when requests leave this machine; privacy rules check it
    guarantees_schema: bool = False  # True when decoding itself enforces response_schema
    backend: str = "custom"  # the kind of backend (llama, dashscope, openai, ...) for telemetry
    role_name: str | None = None  # the agent role a wrapper serves, for telemetry
    telemetry_leaf: bool = True  # False for wrappers: their nested model call records metrics

    # --- what a backend provides -------------------------------------------------------------
    def _generate(self, request: Request) -> Iterator[Chunk]:
        raise NotImplementedError

    # --- the Generator protocol --------------------------------------------------------------
    def complete(self, prompt: str, sampling: Sampling | None = None, **options: Any) -> Completion:
        request = self._request(prompt, None, sampling, options)
        return self._complete(request)

    def chat(self, messages: Sequence[Message | Mapping[str, Any]], sampling: Sampling | None = None,
             *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
             **options: Any) -> Completion:
        request = self._request(None, coerce_messages(messages), sampling, options, tools=tools,
                                tool_choice=tool_choice, response_schema=response_schema)
        return self._complete(request)

    def stream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
               *, tools: ToolsArg = None, tool_choice: Any = None, response_schema: Any = None,
               **options: Any) -> Iterator[Chunk]:
        if isinstance(prompt_or_messages, str):
            request = self._request(prompt_or_messages, None, sampling, options, tools=tools,
                                    tool_choice=tool_choice, response_schema=response_schema)
        else:
            request = self._request(None, coerce_messages(prompt_or_messages), sampling, options,
                                    tools=tools, tool_choice=tool_choice,
                                    response_schema=response_schema)
        return self._traced(request, self._open)

    def generate(self, request: Request) -> Iterator[Chunk]:
        """Stream a ready-made ``Request`` as the backend answers it, before any checking of a
        ``response_schema`` (what wrappers such as roles hand on; they check it themselves)."""
        self._check_open()
        return self._traced(request, self._generate)

    # --- helpers ----------------------------------------------------------------------------
    def _request(self, prompt: str | None, messages: tuple[Message, ...] | None,
                 sampling: Sampling | None, options: Mapping[str, Any],
                 **extras: Any) -> Request:
        self._check_open()
        base = sampling if sampling is not None else self.default_sampling
        parallel = options.get("parallel_tool_calls")
        options = {k: v for k, v in options.items() if k != "parallel_tool_calls"}
        return Request.build(base.merged(options), prompt, messages,
                             parallel_tool_calls=True if parallel is None else parallel,
                             **extras)

    def _checks(self, request: Request) -> bool:
        """Whether this backend's answer to ``request`` must be checked (and may be asked for
        again): a schema or a required tool call that decoding itself does not enforce."""
        return needs_check(request) and not self.guarantees_schema

    def _open(self, request: Request) -> Iterator[Chunk]:
        chunks = self._generate(request)
        if content_logging():
            chunks = logged(chunks, request, self.name)
        return with_checked(chunks, request, self.name) if self._checks(request) else chunks

    def _complete(self, request: Request) -> Completion:
        with telemetry.start(self, request) as call:
            completion = drain_retrying(lambda: self._open(request), self._drain,
                                        retry=self._checks(request), name=self.name)
            call.finish(completion)
        return completion

    def _traced(self, request: Request,
                open_stream: Callable[[Request], Iterator[Chunk]]) -> Iterator[Chunk]:
        """The request's stream under its telemetry span (which starts now, as the work does)."""
        with telemetry.start(self, request, stream=True) as call:
            return call.watch(open_stream(request))

    @staticmethod
    def _drain(chunks: Iterator[Chunk]) -> Completion:
        for chunk in chunks:
            if chunk.completion is not None:
                return chunk.completion
        raise BackendError("the backend ended a stream without a final result")


def content_logging() -> bool:
    """Whether prompts and answers go to the ``tongyi_local.content`` logger: only when
    ``TONGYI_LOCAL_LOG_CONTENT=1`` (for debugging), announced once with a warning."""
    global _content_announced
    if os.environ.get(CONTENT_ENV, "") not in ("1", "true", "yes"):
        return False
    if not _content_announced:
        _content_announced = True
        content_log.warning("%s is set: prompt and output text are logged on %s at DEBUG",
                            CONTENT_ENV, content_log.name)
    return True


def logged(chunks: Iterator[Chunk], request: Request, model: str) -> Iterator[Chunk]:
    """The stream, with its request and final answer logged (the opt-in above)."""
    asked = request.prompt if request.messages is None else [
        (m.role, m.content) for m in request.messages]
    content_log.debug("%s request: %r", model, asked)
    for chunk in chunks:
        if chunk.completion is not None:
            content_log.debug("%s answer: %r", model, chunk.completion.text)
        yield chunk


def needs_check(request: Request) -> bool:
    """Whether an answer can fail the request's own demands (a schema, a required call)."""
    return request.response_schema is not None or request.tool_choice.mode in ("required",
                                                                                 "named")


def with_checked(chunks: Iterator[Chunk], request: Request, model: str) -> Iterator[Chunk]:
    """The stream with its final completion checked against what the request demanded
    (``parsed`` filled), or ``OutputParseError`` at the end."""
    for chunk in chunks:
        if chunk.completion is not None:
            chunk = replace(chunk, completion=check_answer(chunk.completion, request, model))
        yield chunk


def drain_retrying(open_stream: Callable[[], Iterator[Chunk]],
                   drain: Callable[[Iterator[Chunk]], Completion], *, retry: bool,
                   name: str) -> Completion:
    """Drain a stream; an answer that fails its checks is asked for once more when ``retry``."""
    try:
        return drain(open_stream())
    except OutputParseError as exc:
        if not retry:
            raise
        log.info("%s: the answer did not meet the request (%s); asking once more", name,
                 type(exc).__name__)
        return drain(open_stream())
