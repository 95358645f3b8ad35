"""One retry policy for every remote backend: exponential backoff with full jitter.

Why one place: DashScope and OpenAI-compatible servers fail the same ways (429, 5xx, timeouts,
dropped connections), and the rule "retry only what can succeed next time, within a bounded count
and a bounded total time" must not drift between backends. The SDKs' own retry loops are not used.

    RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=8.0, max_total_s=30.0)

Only errors whose ``retryable`` is true are retried (``RateLimitError``, ``ServerError``,
``RemoteTimeoutError``, ``RemoteConnectionError``); authentication and invalid-request errors
surface at once. A stream is retried only while it has yielded nothing: once text reached the
caller, a failure surfaces instead of repeating the answer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ..errors import ConfigError, RemoteError

log = logging.getLogger("tongyi_local.retry")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. ``max_attempts`` counts the first try too."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_total_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(
                f"retry max_attempts must be an integer >= 1 (got {self.max_attempts!r})")
        for field_name in ("base_delay_s", "max_delay_s", "max_total_s"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"retry {field_name} must be a number >= 0 (got {value!r})")

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
        delay = (rng or random).uniform(0, ceiling)
        if error.retry_after_s is not None:
            delay = max(delay, min(error.retry_after_s, self.max_delay_s))
        return delay


def retrying_stream(policy: RetryPolicy, open_stream: Callable[[], Iterator[T]], *,
                    backend: str, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Yield from ``open_stream()``; on a retryable error before the first item, wait and reopen.

    Gives up when the attempts or the total time budget run out and raises the last error, with
    ``attempts`` set so its message says how often it was tried.
    """
    start = clock()
    attempt = 0
    while True:  # bounded: attempt grows each pass and max_attempts ends it
        attempt += 1
        yielded = False
        try:
            for item in open_stream():
                yielded = True
                yield item
            return
        except RemoteError as error:
            error.attempts = attempt
            if yielded or not error.retryable or attempt >= policy.max_attempts:
                raise
            delay = policy.delay_s(attempt, error)
            elapsed = clock() - start
            if elapsed + delay > policy.max_total_s:
                log.warning("%s: not retrying %s after %d attempt(s): the %.1f s retry budget "
                            "is spent", backend, type(error).__name__, attempt, policy.max_total_s)
                raise
            log.info("%s: %s (status %s) on attempt %d/%d; retrying in %.2f s", backend,
                     type(error).__name__, error.status, attempt, policy.max_attempts, delay,
                     extra={"retry": {"backend": backend, "attempt": attempt,
                                      "reason": type(error).__name__, "status": error.status,
                                      "delay_s": round(delay, 3)}})
            sleep(delay)
