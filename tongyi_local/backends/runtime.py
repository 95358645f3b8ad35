"""The llama.cpp runtime, process-wide: initialised once, its log routed into ``logging``, its
messages captured per call, and its build reported (system info, commit).

Why one module: generation (``llama.py``), quantization (``quantize.py``) and all-position logits
(``logits.py``) all call llama.cpp and all need the same setup and the same way of telling *why*
llama.cpp refused something — it reports reasons only through its log callback.

Attribution is per thread: llama.cpp logs on the thread that made the call, so ``captured()``
collects what the calling thread's llama.cpp calls log while the block runs, and nothing another
thread's calls log. Two loads in two threads, one of a refused file, each see only their own
reason; no lock serialises them. (Messages from threads llama.cpp starts itself go to the logger
only.)
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from pathlib import Path

from ..errors import BackendUnavailableError

try:
    import llama_cpp as L
except ImportError:  # pragma: no cover - exercised only without the runtime
    L = None

log = logging.getLogger("tongyi_local.llama")
# ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_LEVEL = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_thread = threading.local()  # .level: the last line's level; .captures: the open Capture blocks
_init_lock = threading.Lock()
_ready = False


class Capture:
    """The warnings and errors llama.cpp logged on this thread while the ``with`` block ran."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=12)

    def __enter__(self) -> Capture:
        stack = getattr(_thread, "captures", None)
        if stack is None:
            stack = _thread.captures = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _thread.captures.remove(self)

    def reason(self, default: str) -> str:
        """llama.cpp's last few complaints, else ``default``: the text of a failure message."""
        return "; ".join(list(self.lines)[-3:]) if self.lines else default


def captured() -> Capture:
    """``with captured() as capture:`` around llama.cpp calls; ``capture.reason(...)`` after."""
    return Capture()


def _on_llama_log(level: int, text: bytes, _user: object) -> None:
    py_level = getattr(_thread, "level", logging.DEBUG) if level == 5 else _LEVEL.get(
        level, logging.DEBUG)
    _thread.level = py_level
    line = text.decode("utf-8", errors="replace").rstrip()
    if not line:
        return
    if py_level >= logging.WARNING:
        for capture in getattr(_thread, "captures", ()):
            capture.lines.append(line)
    log.log(py_level, "%s", line)


_log_callback = L.llama_log_callback(_on_llama_log) if L else None


def ensure_runtime() -> None:
    """Initialise llama.cpp once and route its logging into ``logging`` (not stderr)."""
    global _ready
    if L is None:
        from ..build import BUILD_HINT

        raise BackendUnavailableError(
            f"llama-cpp-python is not installed in this environment; {BUILD_HINT}")
    with _init_lock:
        if not _ready:
            L.llama_log_set(_log_callback, ctypes.c_void_p(0))
            L.llama_backend_init()
            _ready = True


def system_info() -> str:
    """llama.cpp's own report of the SIMD features this build uses."""
    ensure_runtime()
    return L.llama_print_system_info().decode("utf-8", errors="replace")


def build_commit() -> str:
    """The llama.cpp commit this runtime was built from (ggml's own record), or "unknown"."""
    if L is None:
        return "unknown"
    lib_dir = Path(L.__file__).resolve().parent / "lib"
    for candidate in sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml.so*")):
        try:
            lib = ctypes.CDLL(str(candidate))
            lib.ggml_commit.restype = ctypes.c_char_p
            return lib.ggml_commit().decode()
        except (OSError, AttributeError):
            continue
    return "unknown"
