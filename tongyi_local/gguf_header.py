"""Read and validate a GGUF file's header without loading weights.

Why: llama.cpp must never see a file we could have rejected (missing, empty, wrong magic,
unsupported version, truncated), and ``gguf.GGUFReader`` parses every array element into numpy,
which takes seconds on a 262k-token vocabulary. This walks the header once with ``struct``,
using the ``gguf`` package's own tables for value and tensor types, and keeps array values only
when they are short.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.constants import LlamaFileType

from .errors import ConfigError, ModelLoadError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what the pinned llama.cpp reads
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_KEEP_ARRAY_MAX = 64  # longer arrays (vocabularies, merges) are counted, not kept


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: str
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    size_bytes: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int | None:
        return self.arch_value("context_length")

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in self.metadata

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def file_type(self) -> str:
        ftype = self.metadata.get("general.file_type")
        try:
            return LlamaFileType(ftype).name.removeprefix("MOSTLY_")
        except ValueError:
            return "unknown"


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelLoadError(self.path, "file is truncated inside its GGUF header; "
                                            "download it again")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelLoadError(self.path, "file is truncated inside its GGUF header; "
                                            "download it again")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip(self, vtype: GGUFValueType) -> None:
        if vtype in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[vtype])
        elif vtype == GGUFValueType.STRING:
            length = self.take("<Q")
            self.pos += length
        else:
            self.value(vtype)

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = GGUFValueType(self.take("<I")), self.take("<Q")
            if count <= _KEEP_ARRAY_MAX:
                return [self.value(item_type) for _ in range(count)]
            if item_type in _SCALAR:  # skip fixed-size items in one step
                self.pos += struct.calcsize(_SCALAR[item_type]) * count
            else:
                for _ in range(count):
                    self.skip(item_type)
            return _ArrayLength(count)
        return self.take(_SCALAR[vtype])


class _ArrayLength(int):
    """Stands for an array too long to keep (a vocabulary): only its length is recorded."""


def check_path(path: str | os.PathLike[str]) -> Path:
    """The file exists and is a non-empty regular file, else a clear error naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model file not found: {path}; check the path or pull the model")
    if path.is_dir():
        raise ModelLoadError(path, "this is a directory; give the path of a .gguf file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(path, "the file is empty (0 bytes); download it again")
    return path


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and validate the header; raises ``ModelLoadError`` naming the path and the reason."""
    path = check_path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelLoadError(path, "not a GGUF file (wrong magic bytes); "
                                       "convert it with llama.cpp's convert_hf_to_gguf.py")
        fh.seek(0)
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(_Cursor(buf, path), path, size)
    except (struct.error, ValueError) as exc:
        raise ModelLoadError(path, f"corrupt GGUF header ({exc})") from None
    finally:
        buf.close()


def _parse(cur: _Cursor, path: Path, size: int) -> GGUFHeader:
    cur.pos = 4
    version = cur.take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(path, f"GGUF version {version} is not supported (this llama.cpp "
                                   f"reads versions {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"))
        if isinstance(value, _ArrayLength):
            array_lengths[key] = int(value)
        else:
            metadata[key] = value
    raw_tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        ggml_type, offset = cur.take("<I"), cur.take("<Q")
        raw_tensors.append((name, dims, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors, end = [], data_start
    for name, dims, ggml_type, offset in raw_tensors:
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(path, f"tensor {name!r} has unknown type {ggml_type}; "
                                       "this llama.cpp cannot read it") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        tensors.append(TensorInfo(name, dims, qtype.name, n_elements, n_bytes))
        end = max(end, data_start + offset + n_bytes)
    if end > size:
        raise ModelLoadError(path, f"file is truncated: tensor data needs {end} bytes but the "
                                   f"file has {size}; download it again")
    return GGUFHeader(path=path, version=version, size_bytes=size, metadata=metadata,
                      array_lengths=array_lengths, tensors=tuple(tensors))


# --- inspection: summary and memory estimate ---------------------------------------------------
# Why here: the pool's fit check and `models info` need these numbers before (and without)
# loading, and the header walk above already has every shape and type they need.

MiB = 1 << 20
_EXPERT = re.compile(r"_exps(\.|$)")  # ffn_{gate,up,down,gate_up}_exps: routed experts
# llama.cpp's built-in sliding-window layer pattern per architecture (n, dense_first) when the
# file has no `attention.sliding_window_pattern` (llama-model.cpp, models/*.cpp at 0c1e570).
_SWA_PATTERN = {"gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False),
                "gemma3n": (5, False), "cohere2": (4, False), "cohere2moe": (4, True),
                "exaone4": (4, False), "llama4": (4, False), "olmo2": (4, False),
                "gpt-oss": (2, False), "afmoe": (4, False), "plamo3": (8, False)}
_KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


def _as_header(header: GGUFHeader | str | os.PathLike[str]) -> GGUFHeader:
    return header if isinstance(header, GGUFHeader) else read_header(header)


def _n_vocab(h: GGUFHeader) -> int:
    return h.array_lengths.get("tokenizer.ggml.tokens",
                               len(h.metadata.get("tokenizer.ggml.tokens", [])))


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    """A hyperparameter that is one number, or one number per layer."""
    if value is None:
        return [default] * n_layer
    if isinstance(value, list):
        values = [int(v) for v in value] or [default]
        return (values + values[-1:] * n_layer)[:n_layer]
    return [int(value)] * n_layer


@dataclass(frozen=True)
class _Attention:
    n_layer: int
    n_embd: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim_k: int
    head_dim_v: int
    n_swa: int
    is_swa: list[bool]


def _attention(h: GGUFHeader) -> _Attention:
    n_layer = int(h.arch_value("block_count", 0) or 0)
    n_embd = int(h.arch_value("embedding_length", 0) or 0)
    n_head = _per_layer(h.arch_value("attention.head_count"), n_layer, 1)
    n_head_kv = _per_layer(h.arch_value("attention.head_count_kv"), n_layer, 0)
    n_head_kv = [kv if kv or n_head[i] == 0 else n_head[i] for i, kv in enumerate(n_head_kv)]
    width = n_embd // max(max(n_head, default=1), 1)
    hd_k = int(h.arch_value("attention.key_length") or width)
    hd_v = int(h.arch_value("attention.value_length") or width)
    n_swa = int(h.arch_value("attention.sliding_window", 0) or 0)
    pattern = h.arch_value("attention.sliding_window_pattern")
    if not n_swa:
        is_swa = [False] * n_layer
    elif isinstance(pattern, list):
        is_swa = [bool(v) for v in pattern][:n_layer] + [False] * max(0, n_layer - len(pattern))
    else:
        n, dense_first = (int(pattern), False) if pattern is not None else \
            _SWA_PATTERN.get(h.architecture, (1, False))  # unknown: all full-size, the safe side
        is_swa = [n == 0 or (il % n != 0 if dense_first else il % n < n - 1)
                  for il in range(n_layer)]
    return _Attention(n_layer, n_embd, n_head, n_head_kv, hd_k, hd_v, n_swa, is_swa)


def describe(header: GGUFHeader | str | os.PathLike[str]) -> dict[str, Any]:
    """What a model is, from its header alone (no weights read): a JSON-ready dict.

    ``n_params_active`` is the parameters used per token: routed-expert tensors (``*_exps``)
    count ``n_expert_used / n_expert`` of their size, everything else (attention, shared
    experts, router, embeddings) counts fully. For dense models it equals ``n_params``.
    """
    h = _as_header(header)
    att = _attention(h)
    n_expert = int(h.arch_value("expert_count", 0) or 0)
    n_used = int(h.arch_value("expert_used_count", 0) or 0)
    expert = sum(t.n_elements for t in h.tensors if _EXPERT.search(t.name))
    active = h.n_params - expert + (expert * n_used // n_expert if n_expert else expert)
    n_vocab = _n_vocab(h)
    return {
        "path": str(h.path), "name": h.metadata.get("general.name"),
        "architecture": h.architecture, "file_type": h.file_type,
        "size_bytes": h.size_bytes, "tensor_bytes": sum(t.n_bytes for t in h.tensors),
        "n_params": h.n_params, "n_params_active": active,
        "n_expert": n_expert, "n_expert_used": n_used,
        "context_length": h.context_length, "n_layer": att.n_layer, "n_embd": att.n_embd,
        "n_head": max(att.n_head, default=0), "n_head_kv": max(att.n_head_kv, default=0),
        "head_dim_k": att.head_dim_k, "head_dim_v": att.head_dim_v,
        "sliding_window": att.n_swa or None, "n_vocab": n_vocab,
        "has_chat_template": h.has_chat_template,
    }


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a load needs, by part; ``n_ctx`` is the cells per sequence llama.cpp allocates."""
    weights: int
    kv_cache: int
    compute: int
    n_ctx: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


def _row_bytes(kv_type: str, n_elements: int) -> int:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]]
    return -(-n_elements // block) * type_size


def _pad256(n: int) -> int:
    return -(-n // 256) * 256


def memory_breakdown(header: GGUFHeader | str | os.PathLike[str], n_ctx: int,
                     kv_type: str = "f16", n_seq: int = 1, *, n_ubatch: int = 512,
                     swa_full: bool = True) -> MemoryEstimate:
    """Weights + KV cache + compute allowance for a context of ``n_ctx`` tokens per sequence.

    - weights = the file's tensor bytes (what llama.cpp maps; CPU repacking of some quant types
      adds a copy of those tensors on top, e.g. +5% for the starter model).
    - KV cache = n_seq x sum over attention layers of cells x (n_head_kv x head_dim_k bytes of
      K + n_head_kv x head_dim_v bytes of V) in ``kv_type``; head dims from key_length /
      value_length (else n_embd / n_head); n_head_kv may differ per layer. cells = n_ctx capped
      at the trained context (as the backend does) and rounded up to 256 (as llama.cpp does).
      Sliding-window layers hold n_swa + n_ubatch cells (rounded to 256) only when
      ``swa_full=False``; llama.cpp's default (and the backend's) is a full-size SWA cache.
    - compute = f16 KQ mask per KV cache (n_ubatch x its cells per sequence x 2 B)
      + activations (16 B x n_ubatch x the widest of n_embd, n_ff, n_expert_used x expert_ff,
      n_head x head_dim) + logits and output buffer (2 x n_vocab x 4 B per sequence: one
      output per sequence, as the backend sets n_outputs_max) + 1 MiB graph overhead.
      Assumes flash attention, which llama.cpp's "auto" picks on CPU.
    Not modelled: MLA (DeepSeek) caches, recurrent-state layers.
    """
    if kv_type.lower() not in _KV_TYPES:
        raise ConfigError(f"kv_type must be one of {', '.join(_KV_TYPES)}, got {kv_type!r}")
    if n_ctx < 1 or n_seq < 1 or n_ubatch < 1:
        raise ConfigError(f"need n_ctx, n_seq and n_ubatch >= 1 (got {n_ctx}, {n_seq}, {n_ubatch})")
    h = _as_header(header)
    att = _attention(h)
    trained = h.context_length
    cells = _pad256(min(n_ctx, int(trained)) if trained else n_ctx)
    cells_swa = cells if swa_full else min(cells, _pad256(att.n_swa + n_ubatch))
    kv = 0
    for il in range(att.n_layer):
        kv_heads = att.n_head_kv[il]
        if kv_heads:
            row = (_row_bytes(kv_type, kv_heads * att.head_dim_k)
                   + _row_bytes(kv_type, kv_heads * att.head_dim_v))
            kv += (cells_swa if att.is_swa[il] else cells) * row
    kv *= n_seq
    n_ff = max(_per_layer(h.arch_value("feed_forward_length"), att.n_layer, 0), default=0)
    n_ff_exp = int(h.arch_value("expert_feed_forward_length", 0) or 0)
    n_used = int(h.arch_value("expert_used_count", 0) or 0)
    widest = max(att.n_embd, n_ff, n_used * n_ff_exp, max(att.n_head, default=0) * att.head_dim_k)
    mask_cells = cells + (cells_swa if any(att.is_swa) and not all(att.is_swa) else 0)
    compute = (n_ubatch * mask_cells * 2 + 16 * n_ubatch * widest
               + 2 * _n_vocab(h) * 4 * n_seq + MiB)
    return MemoryEstimate(sum(t.n_bytes for t in h.tensors), kv, compute, cells)


def estimate_memory(header: GGUFHeader | str | os.PathLike[str], n_ctx: int,
                    kv_type: str = "f16", n_seq: int = 1, **options: Any) -> int:
    """Bytes to load the model with ``n_ctx`` tokens of context per sequence (see
    ``memory_breakdown`` for the formula and ``options``)."""
    return memory_breakdown(header, n_ctx, kv_type, n_seq, **options).total
