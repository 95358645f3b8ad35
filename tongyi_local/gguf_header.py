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
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.constants import LlamaFileType

from .errors import ModelLoadError, ModelNotFoundError

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

