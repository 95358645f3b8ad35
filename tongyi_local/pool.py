"""Loaded models under a RAM budget.

Why: several roles may run different multi-GB models on one machine. Models are shared by key
(roles resolving to the same file and load settings get one loaded model), checked against a
budget *before* loading, evicted least-recently-used when idle (no request in flight) to make
room, and unloaded after a keep-alive, as Ollama does. A model that cannot fit alone is an error
that gives needed vs available bytes.

The budget is bookkeeping over estimates, not a reading of free memory: mmap'd weights stay
"available" to the kernel, so free memory says little about what a load will really take.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import telemetry
from .display import ROW, Rendered
from .errors import InsufficientMemoryError
from .paths import home_dir
from .types import Generator

DEFAULT_MARGIN = 1 << 30  # left for the OS, Python and everything else
DEFAULT_KEEP_ALIVE_S = 300.0
STATUS_INTERVAL_S = 1.0  # request activity rewrites the status file at most this often


@dataclass
class _Loaded:
    key: Any
    name: str
    generator: Generator | None  # None while loading
    bytes: int
    loaded_at: float
    last_used: float
    in_flight: int = 0
    roles: set[str] = field(default_factory=set)


@dataclass(frozen=True, repr=False)
class LoadedModel(Rendered):
    """What ``ps`` shows for one loaded model (a table row in Jupyter: display.py)."""

    _renderer = ROW

    name: str
    memory_bytes: int
    roles: tuple[str, ...]
    in_flight: int
    idle_s: float
    loaded_s: float


class ModelPool:
    """Thread-safe pool. ``loader(key_spec)`` makes a generator, ``estimator(key_spec)`` its bytes."""

    def __init__(self, loader: Callable[[Any], Generator], estimator: Callable[[Any], int], *,
                 budget_bytes: int | None = None, margin_bytes: int = DEFAULT_MARGIN,
                 keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S,
                 status_dir: Path | None = None) -> None:
        self._loader, self._estimator = loader, estimator
        if budget_bytes is None:
            from .hardware import memory

            budget_bytes = max(memory().available_bytes - margin_bytes, 0)
        self.budget_bytes = budget_bytes
        self.keep_alive_s = keep_alive_s
        self._models: dict[Any, _Loaded] = {}
        self._lock = threading.Condition()
        self._status_file = (status_dir or home_dir() / "run") / f"{os.getpid()}.json"
        self._reaper: threading.Thread | None = None
        self._closed = False
        self._status_at = 0.0  # monotonic time of the last status write
        self._status_timer: threading.Timer | None = None
        telemetry.track_pool(self)

    # --- the one way in -----------------------------------------------------------------------
    @contextmanager
    def checkout(self, key: Any, spec: Any, name: str, role: str | None = None) -> Iterator[Generator]:
        """Hold a loaded model for one request (loading it, and evicting others, if needed)."""
        entry = self._acquire(key, spec, name, role)
        try:
            yield entry.generator
        finally:
            with self._lock:
                entry.in_flight -= 1
                entry.last_used = time.monotonic()
                self._activity()
                self._lock.notify_all()

    def _acquire(self, key: Any, spec: Any, name: str, role: str | None) -> _Loaded:
        with self._lock:
            while True:
                self._expire_idle()
                entry = self._models.get(key)
                if entry is None:
                    break
                if entry.generator is not None:
                    return self._lease(entry, role)
                self._lock.wait()  # another thread is loading this model
            need = self._estimator(spec)
            self._make_room(name, need)
            now = time.monotonic()
            entry = self._models[key] = _Loaded(key, name, None, need, now, now)  # reserved
        try:
            generator = self._loader(spec)  # outside the lock: other models keep serving
        except BaseException:
            with self._lock:
                del self._models[key]
                self._lock.notify_all()
            raise
        with self._lock:
            entry.generator = generator
            entry.loaded_at = time.monotonic()
            self._write_status()
            self._start_reaper()
            self._lock.notify_all()
            return self._lease(entry, role)

    def _lease(self, entry: _Loaded, role: str | None) -> _Loaded:
        entry.in_flight += 1
        entry.last_used = time.monotonic()
        if role and role not in entry.roles:
            entry.roles.add(role)
            self._write_status()
        else:
            self._activity()
        return entry

    def _make_room(self, name: str, need: int) -> None:
        if need > self.budget_bytes:
            raise InsufficientMemoryError(
                f"model {name} needs about {_gib(need)} but the memory budget is "
                f"{_gib(self.budget_bytes)}; free memory, lower context_length, use a smaller "
                "quantization, or raise the budget")
        while self.used_bytes() + need > self.budget_bytes:
            idle = [e for e in self._models.values()
                    if e.in_flight == 0 and e.generator is not None]
            if not idle:
                raise InsufficientMemoryError(
                    f"model {name} needs about {_gib(need)}; {_gib(self.used_bytes())} of the "
                    f"{_gib(self.budget_bytes)} budget is held by models serving requests")
            self._unload(min(idle, key=lambda e: e.last_used))

    def _unload(self, entry: _Loaded) -> None:
        del self._models[entry.key]
        if entry.generator is not None:
            entry.generator.close()
        self._write_status()

    # --- housekeeping -------------------------------------------------------------------------
    def used_bytes(self) -> int:
        return sum(e.bytes for e in self._models.values())

    def _expire_idle(self) -> None:
        if self.keep_alive_s is None:
            return
        now = time.monotonic()
        for entry in list(self._models.values()):
            if (entry.in_flight == 0 and entry.generator is not None
                    and now - entry.last_used >= self.keep_alive_s):
                self._unload(entry)

    def _start_reaper(self) -> None:
        if self.keep_alive_s is None or (self._reaper and self._reaper.is_alive()):
            return

        def reap() -> None:
            with self._lock:
                while self._models and not self._closed:
                    self._lock.wait(timeout=min(self.keep_alive_s, 30.0))
                    self._expire_idle()

        self._reaper = threading.Thread(target=reap, name="tongyi-local-pool-reaper", daemon=True)
        self._reaper.start()

    def ps(self) -> list[LoadedModel]:
        with self._lock:
            now = time.monotonic()
            return [LoadedModel(e.name, e.bytes, tuple(sorted(e.roles)), e.in_flight,
                                now - e.last_used, now - e.loaded_at)
                    for e in sorted(self._models.values(), key=lambda e: -e.last_used)]

    def loaded_generators(self) -> list[Generator]:
        """The generators loaded now (for telemetry's gauges)."""
        with self._lock:
            return [e.generator for e in self._models.values() if e.generator is not None]

    def unload_all(self) -> None:
        with self._lock:
            for entry in list(self._models.values()):
                self._unload(entry)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.unload_all()
            if self._status_timer is not None:
                self._status_timer.cancel()
            self._lock.notify_all()
        self._status_file.unlink(missing_ok=True)

    def _activity(self) -> None:
        """A request started or finished (lock held): refresh the live figures in the status
        file, at most once per ``STATUS_INTERVAL_S``; a change inside the interval is written
        when it ends, so the file never stays behind."""
        wait = self._status_at + STATUS_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._write_status()
        elif self._status_timer is None and not self._closed:
            self._status_timer = threading.Timer(wait, self._deferred_status)
            self._status_timer.daemon = True
            self._status_timer.start()

    def _deferred_status(self) -> None:
        with self._lock:
            self._status_timer = None
            if not self._closed:
                self._write_status()

    def _write_status(self) -> None:
        """Publish what this process has loaded for `tongyi-local ps`: names, sizes, roles and
        live figures (requests in flight and queued, slots busy, decode speed), never text."""
        self._status_at = time.monotonic()
        rows = [_status_row(e) for e in self._models.values()]
        try:
            self._status_file.parent.mkdir(parents=True, exist_ok=True)
            if not rows:
                self._status_file.unlink(missing_ok=True)
                return
            tmp = self._status_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "models": rows}))
            os.replace(tmp, self._status_file)
        except OSError:
            pass  # status is a convenience; never fail a load over it


def _status_row(entry: _Loaded) -> dict[str, Any]:
    row: dict[str, Any] = {"name": entry.name, "memory_bytes": entry.bytes,
                           "roles": sorted(entry.roles), "in_flight": entry.in_flight,
                           "queued": None, "slots_busy": None, "slots": None, "decode": []}
    generator = entry.generator
    if generator is not None and hasattr(generator, "slot_states"):
        try:
            states = generator.slot_states()
            row.update(queued=generator.queued, slots=len(states),
                       slots_busy=sum(1 for s in states if s.busy))
        except Exception:  # noqa: BLE001 - closed meanwhile: the row goes without live figures
            pass
    if generator is not None:
        row["decode"] = telemetry.recent_decode(generator)
    return row


def processes_status(status_dir: Path | None = None) -> list[dict]:
    """Loaded models of every live process on this machine (stale files are removed); each
    model's ``decode_tps`` is its decode speed over the last minute (None when idle)."""
    status_dir = status_dir or home_dir() / "run"
    found = []
    for file in sorted(status_dir.glob("*.json")) if status_dir.exists() else ():
        try:
            data = json.loads(file.read_text())
            os.kill(int(data["pid"]), 0)
        except ProcessLookupError:
            file.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError):
            continue
        now = time.time()
        for model in data.get("models", ()):
            model["decode_tps"] = telemetry.decode_rate(model.get("decode") or (), now)
        found.append(data)
    return found


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
