"""Role prefixes' KV state on disk, shared by every process that loads the same model.

Why: each ``tongyi-local generate --role coder ...`` is a new process that would evaluate the
role's system prompt (and tool definitions) again — seconds on a small model, tens of seconds on a
14B one on CPU. The engine saves a role prefix's sequence state (llama.cpp's
``llama_state_seq_get_data``) once, and a later process restores it
(``llama_state_seq_set_data``) instead of evaluating those tokens.

A state file is ``<key>.kvstate`` in the cache directory (``$TONGYI_LOCAL_HOME/kv`` unless
``$TONGYI_LOCAL_KV_CACHE_DIR`` or the generator says otherwise). The key is the sha256 of
everything the bytes depend on: the model file (path, size, mtime), llama.cpp's build commit,
``n_ctx``, the KV cache type and the exact prefix tokens. The file starts with a header
(``parse_header``) repeating those fields, the tokens, the payload's length and sha256, so a
mismatched, truncated or corrupt file is found before llama.cpp sees its bytes; such a file is
removed (with a debug log that never shows content) and the request evaluates its prompt.

Writes go to a unique temp file that is renamed into place, so readers never see a partial file
and two processes writing the same key leave one complete file (the last rename wins). The
directory is bounded (``max_bytes``, default 2 GiB or ``$TONGYI_LOCAL_KV_CACHE_BYTES``): after
each write the least recently used files go first; a file's mtime is its last use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from .. import paths
from ..errors import ConfigError, TongyiError

log = logging.getLogger("tongyi_local.kv_cache")

DIR_ENV = "TONGYI_LOCAL_KV_CACHE_DIR"
BYTES_ENV = "TONGYI_LOCAL_KV_CACHE_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
DEFAULT_MIN_TOKENS = 256
SUFFIX = ".kvstate"
MAGIC = b"TLKVSEQ\x00"
VERSION = 1
_MAX_META = 64 << 10
_MAX_TOKENS = 1 << 24
_STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died


class StateFileError(TongyiError, ValueError):
    """A state file is not one this build wrote for this key (truncated, corrupt, mismatched)."""


@dataclass(frozen=True)
class PrefixKey:
    """What a sequence state depends on besides its tokens: model file, runtime, context."""

    model: str  # resolved path of the GGUF
    model_size: int
    model_mtime_ns: int
    build: str  # llama.cpp commit
    n_ctx: int
    kv_type: str

    @classmethod
    def for_model(cls, path: Path, *, n_ctx: int, kv_type: str) -> PrefixKey:
        from . import runtime  # loads llama.cpp: not needed to list or clear the cache

        stat = Path(path).stat()
        return cls(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns,
                   runtime.build_commit(), n_ctx, kv_type)

    def digest(self, tokens: list[int] | tuple[int, ...]) -> str:
        """The file name's key: sha256 over these fields and the exact tokens."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(struct.pack(f"<{len(tokens)}i", *tokens))
        return h.hexdigest()


@dataclass(frozen=True)
class StateHeader:
    key: PrefixKey
    tokens: tuple[int, ...]
    payload_len: int
    payload_sha256: bytes
    size: int  # header bytes; the payload follows


@dataclass(frozen=True)
class CacheEntry:
    """One state file, as ``tongyi-local cache ls`` shows it."""

    path: Path
    key: str
    model: str  # the model file's name
    tokens: int
    size_bytes: int
    last_used: float  # epoch seconds


@dataclass(frozen=True)
class PrefixCacheSettings:
    """Where role prefixes are kept, how much disk they may take, and the shortest worth it."""

    directory: Path | None = None  # None: $TONGYI_LOCAL_KV_CACHE_DIR, else <home>/kv
    max_bytes: int | None = None  # None: $TONGYI_LOCAL_KV_CACHE_BYTES, else 2 GiB
    min_tokens: int = DEFAULT_MIN_TOKENS

    def resolved_directory(self) -> Path:
        return Path(self.directory) if self.directory is not None else cache_dir()

    def resolved_max_bytes(self) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        raw = os.environ.get(BYTES_ENV)
        if not raw:
            return DEFAULT_MAX_BYTES
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(f"{BYTES_ENV}={raw!r} is not a byte count; set a whole number "
                              "such as 2147483648, or unset it")
        return value


def cache_dir() -> Path:
    """``$TONGYI_LOCAL_KV_CACHE_DIR``, else ``<home>/kv``."""
    return Path(os.environ.get(DIR_ENV) or paths.home_dir() / "kv")


# --- the file format ---------------------------------------------------------------------------
_FIXED = struct.Struct("<8sHI")  # magic, version, meta length
_COUNT = struct.Struct("<I")
_TAIL = struct.Struct("<Q32s")  # payload length, payload sha256


def encode_header(key: PrefixKey, tokens: list[int] | tuple[int, ...], payload: bytes) -> bytes:
    meta = json.dumps(asdict(key), sort_keys=True).encode()
    return b"".join([_FIXED.pack(MAGIC, VERSION, len(meta)), meta, _COUNT.pack(len(tokens)),
                     struct.pack(f"<{len(tokens)}i", *tokens),
                     _TAIL.pack(len(payload), hashlib.sha256(payload).digest())])


def parse_header(stream: BinaryIO) -> StateHeader:
    """Read a state file's header from ``stream``; ``StateFileError`` for anything else."""

    def take(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise StateFileError("the file ends inside its header")
        return data

    magic, version, meta_len = _FIXED.unpack(take(_FIXED.size))
    if magic != MAGIC:
        raise StateFileError("not a tongyi_local state file")
    if version != VERSION:
        raise StateFileError(f"state file format {version}, this build reads {VERSION}")
    if meta_len > _MAX_META:
        raise StateFileError("header metadata too long")
    raw = take(meta_len)
    try:
        meta = json.loads(raw.decode("utf-8"))
        key = PrefixKey(**meta) if isinstance(meta, dict) else None
    except (ValueError, TypeError, RecursionError):
        key = None
    if key is None or not _well_typed(key):
        raise StateFileError("header metadata is not a prefix key")
    (count,) = _COUNT.unpack(take(_COUNT.size))
    if count > _MAX_TOKENS:
        raise StateFileError("token count out of range")
    tokens = struct.unpack(f"<{count}i", take(4 * count))
    payload_len, checksum = _TAIL.unpack(take(_TAIL.size))
    size = _FIXED.size + meta_len + _COUNT.size + 4 * count + _TAIL.size
    return StateHeader(key, tokens, payload_len, checksum, size)


def _well_typed(key: PrefixKey) -> bool:
    types = {"model": str, "model_size": int, "model_mtime_ns": int, "build": str, "n_ctx": int,
             "kv_type": str}
    return all(type(getattr(key, name)) is kind for name, kind in types.items())


def read_state(path: Path, key: PrefixKey, tokens: list[int]) -> bytearray:
    """The payload of ``path`` if it is a complete state file for exactly (key, tokens)."""
    with open(path, "rb") as f:
        header = parse_header(f)
        if header.key != key:
            raise StateFileError("written for another model file, build, n_ctx or KV type")
        if list(header.tokens) != tokens:
            raise StateFileError("holds other prefix tokens")
        payload = bytearray(header.payload_len)
        if f.readinto(payload) != header.payload_len or f.read(1):
            raise StateFileError("payload length differs from the header's")
    if hashlib.sha256(payload).digest() != header.payload_sha256:
        raise StateFileError("payload checksum mismatch")
    return payload


# --- one model's view of the cache -------------------------------------------------------------
class PrefixStore:
    """The state files of one loaded model (one ``PrefixKey``) in one directory.

    ``load`` and ``discard`` run on the engine thread; ``save`` hands the write to a thread of
    its own (non-daemon: a process that ends right after a request still completes the file).
    """

    def __init__(self, key: PrefixKey, settings: PrefixCacheSettings) -> None:
        self.key = key
        self.directory = settings.resolved_directory()
        self.max_bytes = settings.resolved_max_bytes()
        self.min_tokens = settings.min_tokens
        self._writing: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def path_for(self, tokens: list[int]) -> Path:
        return self.directory / f"{self.key.digest(tokens)}{SUFFIX}"

    def has(self, tokens: list[int]) -> bool:
        name = self.key.digest(tokens)
        with self._lock:
            if name in self._writing:
                return True
        return (self.directory / f"{name}{SUFFIX}").exists()

    def load(self, tokens: list[int]) -> bytearray | None:
        """The saved state of exactly ``tokens``, or None (absent; a bad file is removed)."""
        path = self.path_for(tokens)
        try:
            payload = read_state(path, self.key, tokens)
        except FileNotFoundError:
            return None
        except (OSError, StateFileError) as exc:
            self.discard(tokens, str(exc) if isinstance(exc, StateFileError) else "unreadable")
            return None
        try:
            os.utime(path)  # the file's mtime is its last use (LRU)
        except OSError:
            pass
        return payload

    def discard(self, tokens: list[int], reason: str) -> None:
        path = self.path_for(tokens)
        log.debug("prefix state %s ignored and removed: %s", path.name, reason)
        _unlink(path)

    def save(self, tokens: list[int], payload: bytes) -> None:
        """Write the state of ``tokens`` in the background (skipped when larger than the cap)."""
        if len(payload) > self.max_bytes:
            return
        name = self.key.digest(tokens)
        thread = threading.Thread(target=self._write, args=(name, list(tokens), payload),
                                  name=f"tongyi-local-kv-write-{name[:8]}")
        with self._lock:
            if name in self._writing:
                return
            self._writing[name] = thread
        thread.start()

    def wait(self) -> None:
        """Block until this store's background writes have finished."""
        with self._lock:
            threads = list(self._writing.values())
        for thread in threads:
            thread.join()

    def _write(self, name: str, tokens: list[int], payload: bytes) -> None:
        try:
            write_atomic(self.directory / f"{name}{SUFFIX}",
                         encode_header(self.key, tokens, payload), payload)
            evict(self.directory, self.max_bytes)
            log.debug("prefix state %s saved (%d tokens, %d bytes)", name[:12], len(tokens),
                      len(payload))
        except OSError as exc:
            log.warning("could not save a prefix state in %s: %s", self.directory,
                        exc.strerror or type(exc).__name__)
        finally:
            with self._lock:
                self._writing.pop(name, None)


def write_atomic(path: Path, header: bytes, payload: bytes) -> None:
    """``header + payload`` at ``path`` via a unique temp file and a rename (no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(temp, path)
    except BaseException:
        _unlink(temp)
        raise


# --- the directory as a whole (LRU, listing, clearing) -----------------------------------------
def evict(directory: Path, max_bytes: int) -> int:
    """Remove least recently used state files until the total is at most ``max_bytes``, and
    temp files left by writers that died; returns the bytes freed."""
    files, freed, now = [], 0, time.time()
    for path in _files(directory, "*.tmp"):
        stat = _stat(path)
        if stat is not None and now - stat.st_mtime > _STALE_TEMP_S:
            _unlink(path)
    for path in _files(directory, f"*{SUFFIX}"):
        stat = _stat(path)
        if stat is not None:
            files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        _unlink(path)
        total, freed = total - size, freed + size
    return freed


def entries(directory: Path | None = None) -> list[CacheEntry]:
    """The state files in ``directory`` (default: ``cache_dir()``), most recently used first.
    Files whose header does not parse are listed with model ``"?"``."""
    found = []
    for path in _files(directory or cache_dir(), f"*{SUFFIX}"):
        stat = _stat(path)
        if stat is None:
            continue
        try:
            with open(path, "rb") as f:
                header = parse_header(f)
            model, tokens = Path(header.key.model).name, len(header.tokens)
        except (OSError, StateFileError):
            model, tokens = "?", 0
        found.append(CacheEntry(path, path.name[:-len(SUFFIX)], model, tokens, stat.st_size,
                                stat.st_mtime))
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Remove every state file (and temp file); returns (files, bytes) removed."""
    count = size = 0
    directory = directory or cache_dir()
    for path in _files(directory, f"*{SUFFIX}") + _files(directory, "*.tmp"):
        stat = _stat(path)
        if stat is not None and _unlink(path):
            count += path.suffix == SUFFIX
            size += stat.st_size
    return count, size


def _files(directory: Path, pattern: str) -> list[Path]:
    try:
        return [p for p in directory.glob(pattern) if p.is_file()]
    except OSError:
        return []


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


def parse_header_bytes(data: bytes) -> StateHeader:
    """``parse_header`` over bytes in memory."""
    return parse_header(io.BytesIO(data))
