"""One retry policy for every remote backend: exponential backoff with full jitter.

Why one place: DashScope and OpenAI-compatible servers fail the same ways (429, 5xx, timeouts,
dropped connections), and the rule "retry only what can succeed next time, within a bounded count
and a bounded total time" must not drift between backends. The SDKs' own retry loops are not used.

    RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=8.0, max_total_s=30.0)

Only errors whose ``retryable`` is true are retried (``RateLimitError``, ``ServerError``,
``RemoteTimeoutError``, ``RemoteConnectionError``); authentication and invalid-request errors
surface at once. A stream is retried only while it has yielded nothing: once text reached the
caller, a failure surfaces instead of repeating the answer.

``retrying_stream`` wraps a sync iterator and ``aretrying_stream`` an async one (waiting with
``asyncio.sleep``); both run their attempts in the same ``_Tries``, which decides what an error
means, so the two cannot drift. ``RetryPolicy(seed=...)`` makes the jitter repeatable (tests);
the default is random.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from ..errors import ConfigError, RemoteError

log = logging.getLogger("tongyi_local.retry")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. ``max_attempts`` counts the first try too.

    ``seed`` fixes the jitter: the policy then draws its delays from its own
    ``random.Random(seed)``, so a test sees the same waits every run. Without it the jitter comes
    from the shared ``random`` module, so that many clients do not retry in step.
    """

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_total_s: float = 30.0
    seed: int | None = None
    _rng: ClassVar[random.Random | None] = None  # set per instance when seeded; not a field

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(
                f"retry max_attempts must be an integer >= 1 (got {self.max_attempts!r})")
        for field_name in ("base_delay_s", "max_delay_s", "max_total_s"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"retry {field_name} must be a number >= 0 (got {value!r})")
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool):
                raise ConfigError(f"retry seed must be an integer (got {self.seed!r})")
            object.__setattr__(self, "_rng", random.Random(self.seed))

    @classmethod
    def none(cls) -> RetryPolicy:
        """Fail on the first error (useful behind a fallback that should switch at once)."""
        return cls(max_attempts=1)

    @classmethod
    def coerce(cls, value: RetryPolicy | dict | None) -> RetryPolicy:
        """Accept a policy, a plain mapping (as models.toml gives it) or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, RetryPolicy):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ConfigError(f"unknown retry setting(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(cls.__dataclass_fields__)}")
            return cls(**value)
        raise ConfigError(f"retry must be a RetryPolicy or a mapping, got {type(value).__name__}")

    def delay_s(self, attempt: int, error: RemoteError, rng: random.Random | None = None) -> float:
        """Wait before try ``attempt + 1``: full jitter over an exponential ceiling; a server's
        Retry-After raises the floor (capped by ``max_delay_s``)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        delay = (rng or self._rng or random).uniform(0, ceiling)
        if error.retry_after_s is not None:
            delay = max(delay, min(error.retry_after_s, self.max_delay_s))
        return delay


class _Tries:
    """The policy's decisions over one request's attempts, whatever drives them (a sync loop or
    an async one). Each attempt runs in ``with tries:``; an error leaving it is swallowed when
    it is to be retried (``delay`` then says how long to wait first) and raised otherwise.
    ``yielded`` is set by the loop once an item went out: from then on nothing is retried."""

    def __init__(self, policy: RetryPolicy, backend: str, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.backend = backend
        self.clock = clock
        self.start = clock()
        self.attempt = 0
        self.yielded = False
        self.delay = 0.0

    def __enter__(self) -> _Tries:
        self.attempt += 1
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> bool:
        if not isinstance(error, RemoteError):
            return False
        delay = self._wait_after(error)
        if delay is None:
            return False
        self.delay = delay
        return True

    def _wait_after(self, error: RemoteError) -> float | None:
        """Seconds to wait before the next try, or None when ``error`` must be raised now: it
        is not retryable, text already reached the caller, or the attempts or the time budget
        are spent. Sets ``error.attempts`` so its message says how often it was tried."""
        policy, attempt = self.policy, self.attempt
        error.attempts = attempt
        if self.yielded or not error.retryable or attempt >= policy.max_attempts:
            return None
        delay = policy.delay_s(attempt, error)
        if self.clock() - self.start + delay > policy.max_total_s:
            log.warning("%s: not retrying %s after %d attempt(s): the %.1f s retry budget "
                        "is spent", self.backend, type(error).__name__, attempt,
                        policy.max_total_s)
            return None
        log.info("%s: %s (status %s) on attempt %d/%d; retrying in %.2f s", self.backend,
                 type(error).__name__, error.status, attempt, policy.max_attempts, delay,
                 extra={"retry": {"backend": self.backend, "attempt": attempt,
                                  "reason": type(error).__name__, "status": error.status,
                                  "delay_s": round(delay, 3)}})
        return delay


def retrying_stream(policy: RetryPolicy, open_stream: Callable[[], Iterator[T]], *,
                    backend: str, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Yield from ``open_stream()``; on a retryable error before the first item, wait and reopen.

    Gives up when the attempts or the total time budget run out and raises the last error, with
    ``attempts`` set so its message says how often it was tried.
    """
    tries = _Tries(policy, backend, clock)
    while True:  # bounded: each pass is one attempt and max_attempts ends it
        with tries:
            for item in open_stream():
                tries.yielded = True
                yield item
            return
        sleep(tries.delay)


async def aretrying_stream(policy: RetryPolicy, open_stream: Callable[[], AsyncIterator[T]], *,
                           backend: str,
                           sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                           clock: Callable[[], float] = time.monotonic) -> AsyncIterator[T]:
    """``retrying_stream`` for async iterators: the same decisions, waits on the event loop.

    Each attempt's iterator is closed explicitly (``aclosing``): when the caller closes this
    stream, the attempt under it (and its HTTP response) closes then, not whenever asyncio gets
    round to finalizing an abandoned async generator.
    """
    tries = _Tries(policy, backend, clock)
    while True:  # bounded: each pass is one attempt and max_attempts ends it
        with tries:
            async with aclosing(open_stream()) as items:
                async for item in items:
                    tries.yielded = True
                    yield item
            return
        await sleep(tries.delay)
