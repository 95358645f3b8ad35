"""The memory-bandwidth roofline for decode: how fast decoding could be on this machine.

Why: decoding one token reads (almost) every weight once, so tokens/s can never exceed
memory read bandwidth / bytes read per token. Showing each measured decode rate as a percentage
of that bound says whether a slow model is slow because of the hardware (near 100%: buy bandwidth
or quantize harder) or because of the software (far below: threads, pinning, build flags).
For a mixture-of-experts model only the experts a token is routed to are read, which is why
Tongyi-DeepResearch-30B-A3B decodes like a ~3B model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..gguf_header import GGUFHeader, read_header


@dataclass(frozen=True)
class Bandwidth:
    gb_per_s: float  # best of the repeats, 1 GB = 1e9 bytes
    buffer_mib: int
    threads: int
    method: str = "numpy sum over a buffer larger than the last-level cache, one slice per thread"


def measure_bandwidth(*, buffer_mib: int = 512, threads: int | None = None,
                      repeats: int = 5) -> Bandwidth:
    """Read bandwidth: threads each sum their slice of a large buffer (numpy drops the GIL)."""
    from ..hardware import this_machine_plan

    n = threads or this_machine_plan().threads
    data = np.ones(buffer_mib * 2**20 // 4, dtype=np.float32)
    slices = np.array_split(data, n)
    best = 0.0
    for attempt in range(repeats + 1):  # the first pass faults the pages in and is not counted
        workers = [threading.Thread(target=np.add.reduce, args=(s,)) for s in slices]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        if attempt:
            best = max(best, data.nbytes / elapsed / 1e9)
    return Bandwidth(gb_per_s=best, buffer_mib=buffer_mib, threads=n)


@dataclass(frozen=True)
class TokenBytes:
    total: int          # bytes of all tensors in the file
    per_token: int      # bytes a single decode step reads
    expert_fraction: float | None  # n_expert_used / n_expert for MoE, else None


def bytes_per_token(header: GGUFHeader) -> TokenBytes:
    """Weight bytes one decode step reads, from the GGUF header alone.

    The token embedding contributes one row (a lookup), unless the output projection is tied to
    it and so reads it whole; expert tensors contribute only the routed experts' share.
    """
    names = {t.name for t in header.tensors}
    tied = "output.weight" not in names
    n_expert = header.arch_value("expert_count")
    n_used = header.arch_value("expert_used_count")
    fraction = n_used / n_expert if n_expert and n_used else None
    per_token = 0.0
    for t in header.tensors:
        if t.name == "token_embd.weight" and not tied:
            per_token += t.n_bytes / t.shape[-1] if len(t.shape) > 1 else t.n_bytes
        elif "_exps" in t.name and fraction is not None:
            per_token += t.n_bytes * fraction
        else:
            per_token += t.n_bytes
    return TokenBytes(total=sum(t.n_bytes for t in header.tensors), per_token=int(per_token),
                      expert_fraction=fraction)


@dataclass(frozen=True)
class Roofline:
    model: str
    bytes_per_token: int
    decode_bound_tps: float
    measured_decode_tps: float | None
    percent_of_bound: float | None
    expert_fraction: float | None
    bandwidth_gb_per_s: float


def roofline(path: str | Path, bandwidth: Bandwidth, measured_decode_tps: float | None = None,
             name: str | None = None) -> Roofline:
    header = read_header(path)
    tb = bytes_per_token(header)
    bound = bandwidth.gb_per_s * 1e9 / max(tb.per_token, 1)
    pct = 100 * measured_decode_tps / bound if measured_decode_tps else None
    return Roofline(model=name or header.path.stem, bytes_per_token=tb.per_token,
                    decode_bound_tps=bound, measured_decode_tps=measured_decode_tps,
                    percent_of_bound=pct, expert_fraction=tb.expert_fraction,
                    bandwidth_gb_per_s=bandwidth.gb_per_s)
