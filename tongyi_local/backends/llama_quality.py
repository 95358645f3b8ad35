"""llama.cpp's quantizer and all-position logits, for the evidence pipeline.

Why a module of its own: generation (``backends/llama.py``) keeps one output row per step and a
decode loop tuned for speed; measuring quality needs the opposite — every position's logits over
fixed chunks of a corpus, in a context owned here — and quantizing needs ``llama_model_quantize``.
Both need ``llama_cpp`` directly, so they live under ``backends/``; everything numeric (KLD,
perplexity) is done by ``tongyi_local.evidence.quality`` on the arrays returned here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import (BackendError, BackendUnavailableError, InvalidRequestError, ModelLoadError,
                      QuantizeError)
from ..gguf_header import GGUFHeader, read_header
from ..hardware import this_machine_plan

try:
    import llama_cpp as L
except ImportError:  # pragma: no cover - exercised only without the runtime
    L = None

log = logging.getLogger("tongyi_local.llama")

# Quantization name -> (llama_ftype, the ggml type most of its matrices get). The second value only
# estimates the output size for the progress display; k-quant "_M" mixes lift a few tensors higher.
QUANT_TYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"), "Q8_0": (7, "Q8_0"),
    "Q6_K": (18, "Q6_K"), "Q5_K_M": (17, "Q5_K"), "Q5_K_S": (16, "Q5_K"), "Q5_1": (9, "Q5_1"),
    "Q5_0": (8, "Q5_0"), "Q4_K_M": (15, "Q4_K"), "Q4_K_S": (14, "Q4_K"), "Q4_1": (3, "Q4_1"),
    "Q4_0": (2, "Q4_0"), "IQ4_XS": (30, "IQ4_XS"), "IQ4_NL": (25, "IQ4_NL"),
    "Q3_K_L": (13, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_S": (11, "Q3_K"), "Q2_K": (10, "Q2_K"),
}
UNQUANTIZED = {"F32", "F16", "BF16"}

_init_lock = threading.Lock()
_ready = False


def _ensure_runtime() -> None:
    """Initialise llama.cpp once, with its log routed to the ``tongyi_local.llama`` logger.

    The generation backend owns that routing; reuse it when it is there so its error capture keeps
    working, and install an equivalent forwarder only when it is not.
    """
    global _ready, _fallback_callback
    if L is None:
        from ..build import BUILD_HINT

        raise BackendUnavailableError(
            f"llama-cpp-python is not installed in this environment; {BUILD_HINT}")
    with _init_lock:
        if _ready:
            return
        try:
            from . import llama as generation_backend

            generation_backend._ensure_runtime()
        except (ImportError, AttributeError):
            _fallback_callback = L.llama_log_callback(_forward_log)
            L.llama_log_set(_fallback_callback, ctypes.c_void_p(0))
            L.llama_backend_init()
        _ready = True


_fallback_callback = None
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


def _forward_log(level: int, text: bytes, _user: object) -> None:
    line = text.decode("utf-8", errors="replace").rstrip()
    if line:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", line)


class _Capture(logging.Handler):
    """Collects llama.cpp's warnings while one call runs, to name the reason when it fails."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def reason(self, default: str) -> str:
        return "; ".join(self.lines[-3:]) if self.lines else default


# --- quantization ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeResult:
    source: Path
    output: Path
    type: str
    source_type: str
    source_bytes: int
    output_bytes: int
    seconds: float
    requantized: bool
    imatrix: Path | None
    warning: str | None = None


def is_quantized(header: GGUFHeader) -> bool:
    """True when any matrix is already stored below 16 bits (re-quantizing loses more)."""
    return any(len(t.shape) >= 2 and t.type not in UNQUANTIZED for t in header.tensors)


def estimate_output_bytes(header: GGUFHeader, qtype: str) -> int:
    """Rough size of the quantized file: matrices at the type's base width, vectors as they are."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[QUANT_TYPES[qtype][1]]]
    total = 0
    for t in header.tensors:
        quantizable = len(t.shape) >= 2 and t.shape[0] % block == 0
        total += t.n_elements // block * size if quantizable else t.n_bytes
    return max(total, 1)


def quantize(source: str | os.PathLike[str], output: str | os.PathLike[str], qtype: str, *,
             threads: int | None = None, allow_requantize: bool = False,
             imatrix: str | os.PathLike[str] | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Quantize ``source`` to ``output`` in-process with ``llama_model_quantize``.

    The file appears at ``output`` only when complete (written beside it, then renamed).
    ``on_progress(bytes_written, estimated_total)`` is called a few times a second.
    """
    qtype = qtype.upper()
    if qtype not in QUANT_TYPES:
        raise InvalidRequestError(f"unknown quantization type {qtype!r}; choose one of: "
                                  f"{', '.join(QUANT_TYPES)}")
    header = read_header(source)
    src, dst = header.path, Path(output).expanduser()
    if dst.resolve() == src.resolve():
        raise InvalidRequestError(f"output {dst} is the source file; give another path")
    if not dst.parent.is_dir():
        raise InvalidRequestError(f"output directory {dst.parent} does not exist")
    requantized = is_quantized(header)
    warning = None
    if requantized:
        if not allow_requantize:
            raise InvalidRequestError(
                f"{src} is already quantized ({header.file_type}); re-quantizing can only lose "
                "quality. Quantize from the F16/BF16 original, or pass allow_requantize=True "
                "(--allow-requantize) if that is really what you want")
        warning = (f"re-quantizing {src.name} ({header.file_type}) to {qtype}: quality cannot "
                   "rise above the source's and usually falls further than quantizing the original")
        log.warning("%s", warning)
    _ensure_runtime()
    params = L.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype][0]
    params.nthread = threads or this_machine_plan().threads
    params.allow_requantize = requantized
    keep_alive = _imatrix_param(params, Path(imatrix)) if imatrix else None

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    estimate = estimate_output_bytes(header, qtype)
    outcome: dict[str, int] = {}
    capture = _Capture()
    log.addHandler(capture)
    started = time.perf_counter()
    try:
        worker = threading.Thread(target=lambda: outcome.update(rc=L.llama_model_quantize(
            str(src).encode(), str(tmp).encode(), ctypes.byref(params))), daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if on_progress:
                on_progress(_size(tmp), estimate)
        if outcome.get("rc", 1) != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src} to {qtype}: "
                                f"{capture.reason('llama_model_quantize returned an error')}")
        os.replace(tmp, dst)
    finally:
        log.removeHandler(capture)
        tmp.unlink(missing_ok=True)
        del keep_alive
    seconds = time.perf_counter() - started
    if on_progress:
        on_progress(dst.stat().st_size, dst.stat().st_size)
    return QuantizeResult(source=src, output=dst, type=qtype, source_type=header.file_type,
                          source_bytes=header.size_bytes, output_bytes=dst.stat().st_size,
                          seconds=seconds, requantized=requantized,
                          imatrix=Path(imatrix) if imatrix else None, warning=warning)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _imatrix_param(params: object, path: Path) -> list[object]:
    """Load a llama-imatrix GGUF file into ``params.imatrix``; returns what must stay alive."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read importance matrix {path}: {exc}") from exc
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    entries, keep = [], []
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None:
            continue
        counts = counts.reshape(-1)
        rows = sums.reshape(len(counts), -1)  # one row per expert (one row for dense tensors)
        values = np.where(counts[:, None] > 0, rows / np.maximum(counts[:, None], 1), 1.0)
        values = np.ascontiguousarray(values.reshape(-1), dtype=np.float32)
        if not np.isfinite(values).all():
            raise InvalidRequestError(f"importance matrix {path} has non-finite values for {base}")
        name_b = base.encode()
        keep += [values, name_b]
        entries.append(L.llama_model_imatrix_data(
            name=name_b, data=values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            size=values.size))
    if not entries:
        raise InvalidRequestError(f"{path} holds no importance-matrix entries (*.in_sum2/*.counts); "
                                  "make it with llama-imatrix (GGUF output)")
    array = (L.llama_model_imatrix_data * (len(entries) + 1))(*entries)  # zeroed terminator
    params.imatrix = ctypes.cast(array, ctypes.POINTER(L.llama_model_imatrix_data))
    return keep + [array]


# --- all-position logits ------------------------------------------------------------------
def _free(ctx: object, model: object, batch: object) -> None:
    if batch is not None:
        L.llama_batch_free(batch)
    if ctx:
        L.llama_free(ctx)
    if model:
        L.llama_model_free(model)


class LogitsEvaluator:
    """A model with its own context of ``n_ctx`` positions that returns every position's logits.

    Each chunk is evaluated from an empty cache in one batch, as llama-perplexity does, so the
    figures computed from it are comparable with llama.cpp's own.
    """

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, *, threads: int | None = None):
        header = read_header(path)
        _ensure_runtime()
        if n_ctx < 8:
            raise InvalidRequestError(f"n_ctx must be >= 8 for quality evaluation (got {n_ctx})")
        self.path, self.n_ctx = header.path, n_ctx
        self.file_type, self.size_bytes = header.file_type, header.size_bytes
        capture = _Capture()
        log.addHandler(capture)
        try:
            mparams = L.llama_model_default_params()
            model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
            if not model:
                raise ModelLoadError(self.path, capture.reason("llama.cpp could not load the model"))
            cparams = L.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = n_ctx
            cparams.n_ubatch = min(n_ctx, 512)
            cparams.n_seq_max = 1
            cparams.n_outputs_max = 0  # = n_batch: every position may be an output
            cparams.n_threads = cparams.n_threads_batch = this_machine_plan(threads=threads).threads
            cparams.no_perf = True
            ctx = L.llama_init_from_model(model, cparams)
            if not ctx:
                L.llama_model_free(model)
                raise ModelLoadError(self.path, capture.reason(
                    f"could not create a context of {n_ctx} tokens (out of memory?)"))
        finally:
            log.removeHandler(capture)
        self._model, self._ctx = model, ctx
        self._batch = L.llama_batch_init(n_ctx, 0, 1)
        self._finalizer = weakref.finalize(self, _free, ctx, model, self._batch)
        self._vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        self.bos = L.llama_vocab_bos(self._vocab)

    def tokenize(self, text: str) -> list[int]:
        """As llama-perplexity does: special tokens added (BOS), special text not parsed."""
        from .llama import tokenize

        return tokenize(self._vocab, text, add_special=True, parse_special=False)

    def chunk_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits (float32, one row per position ``first .. len(tokens)-1``) for one chunk."""
        n = len(tokens)
        if not 0 <= first < n <= self.n_ctx:
            raise InvalidRequestError(f"chunk of {n} tokens (scored from {first}) does not fit "
                                      f"n_ctx={self.n_ctx}")
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        b = self._batch
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= first
        b.n_tokens = n
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} while scoring {self.path.name}")
        rows = n - first
        view = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(rows * self.n_vocab,))
        return view.reshape(rows, self.n_vocab).copy()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> LogitsEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def system_info() -> str:
    _ensure_runtime()
    return L.llama_print_system_info().decode("utf-8", errors="replace")
