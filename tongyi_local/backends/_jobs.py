"""A request inside the batching engine (``Job``) and the caller's end of it (``Stream``).

Why separate: the engine thread produces chunks and the caller's thread consumes them; the only
thing they share is the job's queue and its ``cancelled``/``done`` flags. ``Stream.close`` may be
called from any thread (an asyncio task being cancelled, a pump thread, the garbage collector), so
a consumer that walks away frees its slot at the next step instead of generating to the end.
"""

from __future__ import annotations

import queue
import weakref
from collections.abc import Callable
from typing import Protocol

from ..errors import BackendError
from ..types import Chunk
from ._lookup import Drafter
from ._sequence import Sequence

class Shaper(Protocol):
    """Reshapes a request's raw chunks (e.g. holds back tool-call text, parses the answer)."""

    def text(self, text: str) -> str: ...

    def final(self, chunk: Chunk) -> Chunk: ...


CLOSED = object()  # queue sentinel: the request was cancelled; the stream ends quietly


class Job:
    """One request's progress; fields after ``out`` belong to the engine thread."""

    def __init__(self, tokens: list[int], sequence: Sequence, max_tokens: int,
                 started: float) -> None:
        self.tokens = tokens
        self.sequence = sequence
        self.max_tokens = max_tokens
        self.started = started
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.done = False
        self.stream = True  # False: only the final chunk is sent (complete/chat drain it)
        self.exclusive = sequence.sampling.deterministic  # runs alone on an empty cache
        self.cached = 0  # prompt tokens found in the KV cache
        self.follow: tuple | None = None  # (slot, job, n): wait for that job's first n tokens
        self.prefix = 0  # role prefix length (system turn, tools): restored from / saved to disk
        self.save_prefix = False  # evaluation stops at ``prefix`` once, to save its KV state
        self.pending = -1  # sampled token to feed at the next step; -1 while in the prompt
        self.drafter: Drafter | None = None  # prompt-lookup drafting (engine's speculative mode)
        self.draft: list[int] = []  # draft tokens fed after ``pending`` in the current step
        self.n_gen = 0
        self.steps = 0
        self.t_prompt = 0.0
        self.prompt_ms = 0.0
        self.t_first: float | None = None
        self.t_last = 0.0


class Stream:
    """Iterator of a request's chunks; the last one carries the ``Completion``.

    Errors raised by the engine for this request (``ContextOverflowError``, ``BackendError``,
    ``GeneratorClosedError``) are raised from ``next``. ``close()`` cancels the request; so does
    dropping the stream unread.
    """

    def __init__(self, job: Job, cancel: Callable[[Job], None], alive: Callable[[], bool],
                 owner: object, shaper: Shaper | None = None) -> None:
        self._job = job
        self._shaper = shaper
        self._alive = alive
        self._owner = owner  # the generator must outlive its streams (it frees the model)
        self._finished = False
        self._cancel = weakref.finalize(self, cancel, job)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self._finished:
            raise StopIteration
        while True:
            try:
                item = self._job.out.get(timeout=5.0)
                break
            except queue.Empty:
                if not self._alive():  # never expected; better an error than a hang
                    self._end()
                    raise BackendError("the local engine stopped; load the model again") from None
        if item is CLOSED:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._end()
            raise item
        if item.completion is not None:
            self._end()
            return self._shaper.final(item) if self._shaper is not None else item
        if self._shaper is not None:
            text = self._shaper.text(item.text)
            return item if text == item.text else Chunk(text)
        return item

    def quiet(self) -> Stream:
        """Only the final chunk is wanted: no per-token hand-over between threads."""
        self._job.stream = False
        return self

    def close(self) -> None:
        """Cancel the request (thread-safe; a no-op once it has ended)."""
        self._finished = True
        self._cancel()

    def _end(self) -> None:
        self._finished = True
        self._cancel.detach()
