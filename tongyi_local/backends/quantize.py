"""Quantize a GGUF file in-process with llama.cpp's ``llama_model_quantize``.

Why in-process: the evidence pipeline quantizes the same source to several types and measures each;
llama.cpp's own quantizer, called directly, needs no separately built ``llama-quantize`` tool, and
its refusals arrive as ``QuantizeError`` naming llama.cpp's reason.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import InvalidRequestError, QuantizeError
from ..gguf_header import GGUFHeader, read_header
from ..hardware import this_machine_plan
from .runtime import L, captured, ensure_runtime

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
             on_progress: Callable[[int, int], None] | None = None,
             progress: bool = False) -> QuantizeResult:
    """Quantize ``source`` to ``output`` in-process with ``llama_model_quantize``.

    The file appears at ``output`` only when complete (written beside it, then renamed).
    ``on_progress(bytes_written, estimated_total)`` is called a few times a second;
    ``progress=True`` (without ``on_progress``) draws a ``tqdm.auto`` bar instead (a widget in
    Jupyter, text on stderr elsewhere).
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
    ensure_runtime()
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
    capture = captured()

    def run() -> None:  # on its own thread, so progress can be reported; its messages are its own
        with capture:
            outcome["rc"] = L.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                                   ctypes.byref(params))

    bar = ExitStack()
    started = time.perf_counter()
    try:
        if progress and on_progress is None:
            from ..display import progress_bar

            on_progress = bar.enter_context(progress_bar(f"quantizing to {qtype}"))
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if on_progress:
                on_progress(_size(tmp), estimate)
        if outcome.get("rc", 1) != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src} to {qtype}: "
                                f"{capture.reason('llama_model_quantize returned an error')}")
        os.replace(tmp, dst)
        seconds = time.perf_counter() - started
        if on_progress:
            on_progress(dst.stat().st_size, dst.stat().st_size)
    finally:
        tmp.unlink(missing_ok=True)
        del keep_alive
        bar.close()
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
