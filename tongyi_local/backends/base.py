"""Shared front half of every backend: argument handling, draining streams, context management.

A backend implements ``_generate(request)`` (an iterator of chunks whose last one carries the
``Completion``) and ``_release()``; everything the caller touches is here, once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import BackendError, GeneratorClosedError
from ..types import (Chunk, Completion, Message, PromptOrMessages, Request, Sampling,
                     coerce_messages)


class BaseGenerator:
    name: str = "generator"
    default_sampling: Sampling = Sampling()
    remote: bool = False  # True when requests leave this machine; privacy rules check it

    _closed = False

    # --- what a backend provides -------------------------------------------------------------
    def _generate(self, request: Request) -> Iterator[Chunk]:
        raise NotImplementedError

    def _release(self) -> None:
        """Free the backend's resources; called once by ``close``."""

    # --- the Generator protocol --------------------------------------------------------------
    def complete(self, prompt: str, sampling: Sampling | None = None, **options: Any) -> Completion:
        return self._drain(self._generate(self._request(prompt, None, sampling, options)))

    def chat(self, messages: Sequence[Message | Mapping[str, Any]], sampling: Sampling | None = None,
             *, tools: Sequence[Mapping[str, Any]] | None = None, **options: Any) -> Completion:
        request = self._request(None, coerce_messages(messages), sampling, options, tools)
        return self._drain(self._generate(request))

    def stream(self, prompt_or_messages: PromptOrMessages, sampling: Sampling | None = None,
               *, tools: Sequence[Mapping[str, Any]] | None = None,
               **options: Any) -> Iterator[Chunk]:
        if isinstance(prompt_or_messages, str):
            request = self._request(prompt_or_messages, None, sampling, options, tools)
        else:
            request = self._request(None, coerce_messages(prompt_or_messages), sampling, options,
                                    tools)
        return self._generate(request)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> BaseGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers ----------------------------------------------------------------------------
    def _request(self, prompt: str | None, messages: tuple[Message, ...] | None,
                 sampling: Sampling | None, options: Mapping[str, Any],
                 tools: Sequence[Mapping[str, Any]] | None = None) -> Request:
        if self._closed:
            raise GeneratorClosedError(f"{self.name} is closed; create a new generator")
        base = sampling if sampling is not None else self.default_sampling
        return Request(sampling=base.merged(options), prompt=prompt, messages=messages,
                       tools=tuple(tools or ()))

    @staticmethod
    def _drain(chunks: Iterator[Chunk]) -> Completion:
        for chunk in chunks:
            if chunk.completion is not None:
                return chunk.completion
        raise BackendError("the backend ended a stream without a final result")
