"""Read and validate a GGUF file's header without loading weights.

Why: llama.cpp must never see a file we could have rejected. Its GGUF reader refuses most
malformed headers cleanly, but its model loader and graph *abort the process* on values they do
not expect (``GGML_ASSERT`` on layer and expert counts, head sizes, the rope scaling type, a
repeated vocabulary token, unaligned or non-F32 vectors, uncaught C++ exceptions in the
tokenizer, ...), and a truncated or corrupt file should be reported as such, naming the file,
not as a crash or a puzzle. Mutation fuzzing
(``benchmarks/reliability.py``) found each of those aborts; each rule below names the one it
prevents. The walk applies the rules of the pinned llama.cpp (``ggml/src/gguf.cpp``,
``src/llama-model.cpp``, ``src/llama-vocab.cpp`` at 0c1e570) and the bounds our own inspection
code needs, and raises ``ModelLoadError(path, reason)`` for anything else:

- counts and lengths fit the file and llama.cpp's limits before anything is walked or read;
- keys are non-empty and unique, value types known, arrays not nested, alignment a power of
  two of at least 32 and a uint32;
- tensor names (< 64 bytes) unique, at most 4 dimensions, element counts that fit 64 bits,
  known types that the CPU backend computes with (F32 for vectors), whole quantization blocks,
  data in order, aligned, without gaps or overlap, and inside the file;
- the hyperparameters llama.cpp asserts on are integers in range (layers, experts, head and
  rope sizes, the sliding window) and norm epsilons finite and >= 0;
- the tokenizer: there is one, its tokens are unique, a SentencePiece vocabulary has a token
  for every byte, a WordPiece one types none as a byte.

What it does not check, and llama.cpp's own handling is then the only line of defence: the
tensor *data* (NaNs or garbage load and generate garbage), architecture-specific tensor shapes
and hyperparameters (its loader refuses wrong shapes cleanly), and tensor types beyond what the
CPU backend can compute with. ``gguf.GGUFReader`` is not used because it parses every array
element into numpy (20 s on a 262k-token vocabulary); this reads only the header, through a
window of the file (no mmap: a file truncated under us must be an error, not a SIGBUS), and
keeps array values only when they are short.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.constants import LlamaFileType

from . import kv_types
from .errors import ConfigError, ModelLoadError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what the pinned llama.cpp reads
DEFAULT_ALIGNMENT = 32
# llama.cpp's limits: gguf.cpp (GGUF_MAX_STRING_LENGTH, GGUF_MAX_ARRAY_ELEMENTS), ggml.h
# (GGML_MAX_DIMS, GGML_MAX_NAME with its NUL), llama-hparams.h (LLAMA_MAX_LAYERS, _EXPERTS).
MAX_STRING_BYTES = 1 << 30
MAX_ARRAY_ITEMS = 1 << 30
MAX_DIMS = 4
MAX_TENSOR_NAME_BYTES = 63
MAX_LAYERS = 512
MAX_EXPERTS = 1024
# Ours: far above any real model (the largest GGUFs have ~100 keys of < 100 bytes and ~2,000
# tensors); they bound the time and memory a hostile header can cost before it is refused.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_SLIDING_WINDOW = 1 << 24  # above any trained context; llama.cpp reserves 8 B per position
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Types llama.cpp's CPU backend multiplies matrices in (a ``vec_dot`` in ggml-cpu.c's type
# traits); a weight of another type (I8..I64, F64, Q8_1, Q8_K) crashes the graph.
MATMUL_TYPES = frozenset({
    "F32", "F16", "BF16", "Q1_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "NVFP4",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ2_S",
    "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"})
# Architectures whose graph builder (src/models/<arch>.cpp at 0c1e570) asserts that the K and
# V head sizes are equal (attention.key_length == attention.value_length), and the first group
# also that the rope dimension count equals them; derived by scanning those files for
# ``GGML_ASSERT(n_embd_head == hparams.n_embd_head_k())`` and ``== n_rot``.
SAME_HEAD_AND_ROPE_DIMS = frozenset({
    "apertus", "arcee", "arctic", "baichuan", "chameleon", "codeshell", "cogvlm", "cohere2moe",
    "dbrx", "deci", "deepseek", "dots1", "dream", "ernie4_5", "ernie4_5-moe", "exaone", "falcon",
    "granite", "granite_swa", "graniteswitch", "grok", "grovemoe", "hunyuan-moe", "hunyuan_vl",
    "hy_v3", "internlm2", "jais2", "llada", "llada-moe", "llama", "llama4", "maincoder",
    "mellum", "minimax-01", "minimax-m2", "mistral3", "nemotron", "olmo", "olmo2", "olmoe",
    "orion", "paddleocr", "pangu-embedded", "plamo", "pockettts", "qwen2", "qwen2moe", "qwen2vl",
    "qwen3", "qwen3moe", "qwen3vl", "qwen3vlmoe", "rnd1", "seed_oss", "smallthinker", "smollm3",
    "starcoder2", "xverse"})
SAME_HEAD_DIMS = SAME_HEAD_AND_ROPE_DIMS | {
    "afmoe", "bailingmoe2", "bert", "bitnet", "bloom", "chatglm", "cohere2", "command-r",
    "deepseek4", "dflash", "eagle3", "eurobert", "glm4", "glm4moe", "gpt2", "gptneox",
    "granitehybrid", "jais", "laguna", "minimax-m3", "modern-bert", "mpt", "muse-glimmer",
    "nanbeige", "nemotron_h", "nemotron_h_moe", "neo-bert", "openelm", "phi2", "phi3", "qwen",
    "qwen35", "qwen35moe", "qwen3next", "qwen4exp", "refact", "spark2_5", "stablelm",
    "starcoder", "t5"}
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
_KEEP_ARRAY_MAX = 64  # longer string arrays (vocabularies, merges) are counted, not kept
_KEEP_NUMBERS_MAX = 512  # numeric arrays up to one item per layer (LLAMA_MAX_LAYERS) are kept
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, data offset
_TOKENS = "tokenizer.ggml.tokens"
_TOKEN_TYPES = "tokenizer.ggml.token_type"
_BYTE_TOKEN = 6  # llama.cpp's LLAMA_TOKEN_TYPE_BYTE
_CHUNK = 1 << 20  # the header is read in windows of at least this many bytes
_KEEP_STRING_MAX = 16 << 20  # longer string values are stepped over, their length recorded
_REDOWNLOAD = "the file is corrupt or was written by a broken converter; download it again"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: str
    n_elements: int
    n_bytes: int
    offset: int = 0  # of its data, from ``GGUFHeader.data_offset``


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    size_bytes: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]  # values too long to keep: items (arrays) or bytes (strings)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    data_offset: int = 0  # where tensor data starts in the file
    alignment: int = DEFAULT_ALIGNMENT

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
    """Reads the header through a window of the file (``buf`` holds it from offset ``base``);
    ``pos`` is a file offset. Every read is bounds-checked, so a bad length or count becomes a
    ``ModelLoadError`` naming what was being read, and what is stepped over is never read."""

    def __init__(self, fh: BinaryIO, path: Path, size: int) -> None:
        self.fh, self.path, self.size = fh, path, size
        self.buf, self.base, self.pos = b"", 0, 0
        self.where = "the GGUF header"  # what is being read, for messages
        self.vocabulary: set[bytes] | None = None  # the token texts, once read
        self.token_types_at: int | None = None  # where the token-type array starts

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(self.path, f"{self.where}: {reason}")

    def room(self, n: int) -> None:
        """The file holds ``n`` more bytes from here (nothing is read), else it is truncated."""
        if n > self.size - self.pos:
            raise ModelLoadError(self.path, f"file is truncated inside its GGUF header (reading "
                                            f"{self.where}: {n} bytes needed at offset "
                                            f"{self.pos}, the file has {self.size}); download "
                                            "it again")

    def need(self, n: int) -> None:
        """The ``n`` bytes from here are in the window (read on demand)."""
        end = self.base + len(self.buf)
        if self.base <= self.pos and self.pos + n <= end:
            return
        self.room(n)
        inside = self.base <= self.pos < end
        start = end if inside else self.pos
        keep = self.buf[self.pos - self.base:] if inside else b""
        self.fh.seek(start)
        got = self.fh.read(min(max(self.pos + n - start, _CHUNK), self.size - start))
        self.buf, self.base = keep + got, self.pos
        if len(self.buf) < n:  # the file shrank under us
            self.size = self.base + len(self.buf)
            self.room(n)

    def skip(self, n: int) -> None:
        self.room(n)
        self.pos += n

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos - self.base)
        self.pos += size
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES, why: str = "llama.cpp's") -> str:
        """A string of at most ``limit`` bytes (checked before anything is read)."""
        n = self.take("<Q")
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes, more than {why} limit of {limit}; "
                            f"{_REDOWNLOAD}")
        self.need(n)
        at = self.pos - self.base
        self.pos += n
        return str(memoryview(self.buf)[at:at + n], "utf-8", "replace")

    def value(self, vtype: int, *, unique: bool = False) -> Any:
        """A value of ``vtype``; ``unique``: a string array whose items must differ."""
        if vtype == GGUFValueType.STRING:
            return self.long_string() or self.string("its string value")
        if vtype == GGUFValueType.ARRAY:
            return self.array(unique)
        fmt = _SCALAR.get(vtype)  # type: ignore[call-overload]
        if fmt is None:
            raise self.fail(f"unknown value type {vtype}; {_REDOWNLOAD}")
        return self.take(fmt)

    def long_string(self) -> _NotKept | None:
        """A string value too long to keep is stepped over; None leaves it to ``string``."""
        n = self.take("<Q")
        self.pos -= 8
        if n <= _KEEP_STRING_MAX or n > MAX_STRING_BYTES:
            return None
        self.skip(8 + n)
        return _NotKept(n)

    def array(self, unique: bool = False) -> Any:
        item_type, count = self.take("<I"), self.take("<Q")
        if item_type == GGUFValueType.ARRAY:
            raise self.fail(f"an array of arrays, which GGUF does not allow; {_REDOWNLOAD}")
        if item_type != GGUFValueType.STRING and item_type not in _SCALAR:
            raise self.fail(f"an array of unknown value type {item_type}; {_REDOWNLOAD}")
        if count > MAX_ARRAY_ITEMS:
            raise self.fail(f"an array of {count} items, more than llama.cpp's limit of "
                            f"{MAX_ARRAY_ITEMS}; {_REDOWNLOAD}")
        item_size = 8 if item_type == GGUFValueType.STRING else struct.calcsize(_SCALAR[item_type])
        self.room(count * item_size)  # the least the items take: bounds the walk below
        if unique and item_type == GGUFValueType.STRING:  # compared as bytes
            start, self.vocabulary = self.pos, set()
            self.skip_strings(count, self.vocabulary)
            if count > _KEEP_ARRAY_MAX:
                return _NotKept(count)
            self.pos = start  # short: read again, to keep
        if count <= (_KEEP_ARRAY_MAX if item_type == GGUFValueType.STRING else _KEEP_NUMBERS_MAX):
            items = [self.value(item_type) for _ in range(count)]
            return _NotKept(count) if any(isinstance(v, _NotKept) for v in items) else items
        if item_type == GGUFValueType.STRING:
            self.skip_strings(count)
        else:
            self.skip(item_size * count)
        return _NotKept(count)

    def skip_strings(self, count: int, seen: set[bytes] | None = None) -> None:
        """Step over ``count`` strings (a vocabulary): the hot loop of a big header. With
        ``seen``, each item is also checked against the ones before it."""
        if count:
            self.need(8)  # the window holds pos (it may have been rewound)
        unpack, buf, base, pos = _U64.unpack_from, self.buf, self.base, self.pos
        end = base + len(buf)
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8)
                buf, base = self.buf, self.base
                end = base + len(buf)
            (n,) = unpack(buf, pos - base)
            pos += 8
            if pos + n > end:
                self.pos = pos - 8
                if n > MAX_STRING_BYTES:
                    raise self.fail(f"an array item claims {n} bytes, more than llama.cpp's "
                                    f"limit of {MAX_STRING_BYTES}; {_REDOWNLOAD}")
                self.skip(8 + n)
                if seen is None:
                    pos = self.pos
                    continue
                self.pos -= n
                self.need(n)  # to compare it, the item must be read
                buf, base = self.buf, self.base
                end = base + len(buf)
            if seen is not None:
                token = buf[pos - base:pos - base + n] or b"[EMPTY_%d]" % i
                if token in seen:
                    raise self._repeated(i, token)
                seen.add(token)
            pos += n
        self.pos = pos

    def _repeated(self, i: int, token: bytes) -> ModelLoadError:
        """llama.cpp maps token text to id and aborts when two ids share a text (llama-vocab.cpp,
        ``id_to_token.size() == token_to_id.size()``); an empty token stands for "[EMPTY_<i>]"."""
        return self.fail(f"token {i} {_shown(token.decode('utf-8', 'replace'))} appears twice in "
                         f"the vocabulary (llama.cpp would abort the process on it); {_REDOWNLOAD}")


class _NotKept(int):
    """Stands for a value too long to keep (a vocabulary, a huge string): only its length
    (items or bytes) is recorded, in ``GGUFHeader.array_lengths``."""


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
    """Parse and validate the header; raises ``ModelLoadError`` naming the path and the reason.

    Only our own mistakes escape as other exceptions: every malformed input is a reason.
    """
    path = check_path(path)
    try:
        with open(path, "rb") as fh:
            header = _read(fh, path)
    except OSError as exc:  # no permission, or an I/O error part-way (a failing disk, a share)
        raise ModelLoadError(path, f"cannot read the file ({exc.strerror or exc}); check that "
                                   "it is readable") from exc
    _check_hparams(header)
    return header


def _read(fh: BinaryIO, path: Path) -> GGUFHeader:
    size = os.fstat(fh.fileno()).st_size
    if fh.read(4) != GGUF_MAGIC:
        raise ModelLoadError(path, "not a GGUF file (wrong magic bytes); "
                                   "convert it with llama.cpp's convert_hf_to_gguf.py")
    return _parse(_Cursor(fh, path, size))


def _parse(cur: _Cursor) -> GGUFHeader:
    cur.pos = 4
    version = cur.take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(cur.path, f"GGUF version {version} is not supported (this llama.cpp "
                                       f"reads versions {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    _check_count(cur, "metadata keys", n_kv, MAX_KEYS, _MIN_KV_BYTES)
    _check_count(cur, "tensors", n_tensors, MAX_TENSORS, _MIN_TENSOR_BYTES)
    metadata, array_lengths = _read_metadata(cur, n_kv)
    _check_tokenizer(cur, metadata)
    alignment = _alignment(cur, metadata)
    raw, names = [], set()
    for i in range(n_tensors):
        raw.append(_read_tensor_info(cur, i))
        if raw[-1][0] in names:  # checked as we go: a corrupt list stops at its first repeat
            raise cur.fail(f"tensor name {_shown(raw[-1][0])} appears twice; {_REDOWNLOAD}")
        names.add(raw[-1][0])
    data_offset = -(-cur.pos // alignment) * alignment if n_tensors else cur.pos
    tensors = _layout(cur, raw, alignment, data_offset)
    return GGUFHeader(path=cur.path, version=version, size_bytes=cur.size, metadata=metadata,
                      array_lengths=array_lengths, tensors=tensors, data_offset=data_offset,
                      alignment=alignment)


def _check_tokenizer(cur: _Cursor, metadata: dict[str, Any]) -> None:
    """A model without a tokenizer ("none", "no_vocab") cannot take a prompt: llama.cpp asserts
    on the first one. A SentencePiece ("llama") vocabulary falls back to byte tokens for text it
    has no token for, looking each byte up as "<0xXX>" or the byte itself with
    ``unordered_map::at``: a missing one throws through the C API, and the process aborts."""
    model = metadata.get("tokenizer.ggml.model")
    if model in ("none", "no_vocab"):
        cur.where = "metadata key 'tokenizer.ggml.model'"
        raise cur.fail(f"{model!r}: the model has no tokenizer, so it cannot read a prompt "
                       "(llama.cpp would abort on the first one); use a GGUF with a vocabulary")
    if model == "bert" and _has_byte_tokens(cur):
        cur.where = f"metadata key {_TOKEN_TYPES!r}"
        raise cur.fail("a WordPiece ('bert') vocabulary with tokens typed as bytes, which "
                       f"llama.cpp aborts on while loading it; {_REDOWNLOAD}")
    if model != "llama" or cur.vocabulary is None:
        return
    missing = [b for b in range(256) if b"<0x%02X>" % b not in cur.vocabulary
               and (b == 0 or bytes([b]) not in cur.vocabulary)]
    if missing:
        cur.where = f"metadata key {_TOKENS!r}"
        raise cur.fail(f"a SentencePiece ('llama') vocabulary needs a token for every byte; "
                       f"{len(missing)} are missing, such as <0x{missing[0]:02X}> (llama.cpp "
                       f"would abort tokenizing text that needs it); {_REDOWNLOAD}")


def _has_byte_tokens(cur: _Cursor) -> bool:
    """Whether the int32 token-type array types any token as a byte (read again, in windows)."""
    if cur.token_types_at is None:
        return False
    end, cur.pos = cur.pos, cur.token_types_at
    try:
        if cur.take("<I") != GGUFValueType.INT32:
            return False  # llama.cpp refuses other item types itself, cleanly
        left = cur.take("<Q") * 4
        while left:
            n = min(left, _CHUNK)
            cur.need(n)
            at = cur.pos - cur.base
            if any(i % 4 == 0 for i in _offsets(cur.buf, struct.pack("<i", _BYTE_TOKEN), at,
                                                at + n)):
                return True
            cur.pos, left = cur.pos + n, left - n
        return False
    finally:
        cur.pos = end


def _offsets(buf: bytes, needle: bytes, start: int, end: int) -> Iterator[int]:
    """Offsets (from ``start``) of ``needle`` in ``buf[start:end]``."""
    at = buf.find(needle, start, end)
    while at >= 0:
        yield at - start
        at = buf.find(needle, at + 1, end)


def _check_count(cur: _Cursor, what: str, n: int, limit: int, min_bytes: int) -> None:
    """A count the rest of the file cannot hold is refused before any walk over it."""
    if n > limit:
        raise ModelLoadError(cur.path, f"the GGUF header claims {n} {what}, more than the "
                                       f"{limit} any real model has; {_REDOWNLOAD}")
    if n > (cur.size - cur.pos) // min_bytes:
        raise ModelLoadError(cur.path, f"file is truncated or corrupt: the GGUF header claims {n} "
                                       f"{what}, more than the {cur.size}-byte file can hold; "
                                       "download it again")


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, int]]:
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        cur.where = f"metadata key #{i}"
        key = cur.string("its name", MAX_KEY_BYTES, "our")
        if not key:
            raise cur.fail(f"the key name is empty; {_REDOWNLOAD}")
        if key in types:
            raise cur.fail(f"key {_shown(key)} appears twice; {_REDOWNLOAD}")
        cur.where = f"metadata key {_shown(key)}"
        types[key] = cur.take("<I")
        if key == _TOKEN_TYPES and types[key] == GGUFValueType.ARRAY:
            cur.token_types_at = cur.pos  # read again only if the tokenizer needs a look
        value = cur.value(types[key], unique=key == _TOKENS)
        if isinstance(value, _NotKept):
            array_lengths[key] = int(value)
        else:
            metadata[key] = value
    if types.get("general.alignment", GGUFValueType.UINT32) != GGUFValueType.UINT32:
        cur.where = "metadata key 'general.alignment'"
        raise cur.fail(f"must be a uint32 (llama.cpp refuses any other type), not "
                       f"{_type_name(types['general.alignment'])}; {_REDOWNLOAD}")
    return metadata, array_lengths


def _shown(value: Any) -> str:
    """A name or value from the file, for a message: its repr, cut short (a text inside its
    quotes: a corrupt key can be 64 KiB of control bytes)."""
    text = repr(value)
    if len(text) <= 80:
        return text
    if not isinstance(value, str):
        return text[:77] + "..."
    while len(repr(value)) > 77:
        value = value[:len(value) * 3 // 4]
    return repr(value + "...")


def _type_name(vtype: int) -> str:
    try:
        return GGUFValueType(vtype).name.lower()
    except ValueError:
        return f"type {vtype}"


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    """A power of two (gguf.cpp's rule), and at least 32: a smaller one passes gguf.cpp but
    leaves tensor data unaligned in memory, which ggml-backend aborts on."""
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    cur.where = "metadata key 'general.alignment'"
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.fail(f"{alignment} is not a power of two; {_REDOWNLOAD}")
    if alignment < DEFAULT_ALIGNMENT:
        raise cur.fail(f"{alignment} is below {DEFAULT_ALIGNMENT} (llama.cpp would abort on "
                       f"tensor data aligned to fewer bytes); {_REDOWNLOAD}")
    return alignment


def _read_tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor record: (name, dims, ggml type, data offset), each field bounds-checked."""
    cur.where = f"tensor #{i}"
    name = cur.string("its name", MAX_TENSOR_NAME_BYTES)
    cur.where = f"tensor {_shown(name)}"
    n_dims = cur.take("<I")
    if n_dims > MAX_DIMS:
        raise cur.fail(f"{n_dims} dimensions, more than ggml's {MAX_DIMS}; {_REDOWNLOAD}")
    dims = tuple(cur.take("<q") for _ in range(n_dims))
    if any(d < 0 for d in dims):
        raise cur.fail(f"shape {_unsigned(dims)} has a dimension >= 2**63; {_REDOWNLOAD}")
    if math.prod(dims) >= 1 << 63:
        raise cur.fail(f"shape {dims} has more elements than a 64-bit count holds; {_REDOWNLOAD}")
    return name, dims, cur.take("<I"), cur.take("<Q")


def _unsigned(dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d % (1 << 64) for d in dims)


def _layout(cur: _Cursor, raw: list[tuple[str, tuple[int, ...], int, int]], alignment: int,
            data_offset: int) -> tuple[TensorInfo, ...]:
    """Types are known, each tensor's data follows the previous one's (aligned: what llama.cpp
    requires, so no overlap and no gap), and the last one ends inside the file."""
    tensors, expected = [], 0
    for name, dims, ggml_type, offset in raw:
        cur.where = f"tensor {_shown(name)}"
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.fail(f"unknown type {ggml_type}; this llama.cpp cannot read it") from None
        if len(dims) < 2 and qtype.name != "F32":
            raise cur.fail(f"a vector (norm or bias) of type {qtype.name}: llama.cpp's CPU "
                           "backend adds and multiplies F32 vectors only (it would abort); "
                           f"{_REDOWNLOAD}")
        if len(dims) >= 2 and qtype.name not in MATMUL_TYPES:
            raise cur.fail(f"a matrix of type {qtype.name}, which llama.cpp's CPU backend cannot "
                           f"multiply (it would crash); {_REDOWNLOAD}")
        if dims and dims[0] % block:
            raise cur.fail(f"rows of {dims[0]} {qtype.name} elements are not a whole number of "
                           f"{block}-element blocks; {_REDOWNLOAD}")
        n_elements = math.prod(dims)
        n_bytes = n_elements // block * type_size
        if offset != expected:
            raise cur.fail(f"its data is at offset {offset} of the data section, expected "
                           f"{expected}: tensor data must follow the tensor list in order, each "
                           f"aligned to {alignment} bytes (overlapping, misplaced or misaligned "
                           f"tensor data); {_REDOWNLOAD}")
        end = data_offset + offset + n_bytes
        if end > cur.size:
            raise ModelLoadError(cur.path, f"file is truncated: tensor data needs {end} bytes "
                                           f"but the file has {cur.size}; download it again")
        tensors.append(TensorInfo(name, dims, qtype.name, n_elements, n_bytes, offset))
        expected += -(-n_bytes // alignment) * alignment
    return tuple(tensors)


# --- hyperparameters llama.cpp's loader asserts on (and our inspection code reads) -------------

_COUNT_KEYS = ("block_count", "embedding_length", "context_length", "feed_forward_length",
               "attention.head_count", "attention.head_count_kv", "attention.key_length",
               "attention.value_length", "attention.sliding_window", "rope.dimension_count",
               "expert_count",
               "expert_used_count", "expert_feed_forward_length", "expert_group_count",
               "expert_group_used_count", "nextn_predict_layers")
_EPSILON_KEYS = ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon")
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv",
                   "expert_used_count")


def _check_hparams(h: GGUFHeader) -> None:
    """Refuse values that make llama.cpp abort (GGML_ASSERT in ``load_hparams``) or that our
    own inspection (``describe``, ``memory_breakdown``) cannot use, naming key and rule."""
    for key in _COUNT_KEYS:
        _count(h, key)
    window = h.arch_value("attention.sliding_window")
    if window is not None and window > MAX_SLIDING_WINDOW:
        raise _hparam_error(h, "attention.sliding_window", f"must be at most {MAX_SLIDING_WINDOW}: "
                            "llama.cpp reserves memory in proportion to it at every step")
    n_layer = h.arch_value("block_count")
    if n_layer is not None and not 1 <= n_layer <= MAX_LAYERS:
        raise _hparam_error(h, "block_count", f"must be 1 to {MAX_LAYERS} layers")
    if n_layer is not None and (h.arch_value("nextn_predict_layers") or 0) > n_layer:
        raise _hparam_error(h, "nextn_predict_layers", f"must not exceed block_count ({n_layer})")
    _check_experts(h)
    _check_head_dims(h)
    for key in _EPSILON_KEYS:  # ggml's norm ops assert eps >= 0 (NaN fails it too)
        eps = h.arch_value(key)
        if eps is not None and not (_is_number(eps) and math.isfinite(eps) and eps >= 0):
            raise _hparam_error(h, key, "must be a finite number >= 0")
    pattern = h.arch_value("attention.sliding_window_pattern")  # a period, or a bool per layer
    if pattern is not None and not (
            _is_number(pattern) and isinstance(pattern, int) and 0 <= pattern < 1 << 32
            or isinstance(pattern, list) and all(isinstance(v, (bool, int)) for v in pattern)):
        raise _hparam_error(h, "attention.sliding_window_pattern", "must be an integer or a "
                            "list of booleans, one per layer", aborts=False)
    scaling = h.arch_value("rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise _hparam_error(h, "rope.scaling.type",
                            f"must be one of {', '.join(ROPE_SCALING_TYPES)}")


def _count(h: GGUFHeader, key: str) -> None:
    """A count is an unsigned integer (or, per layer, a list of them), never a bool or float."""
    value = h.arch_value(key)
    items = value if isinstance(value, list) and key in _PER_LAYER_KEYS else [value]
    if value is not None and not all(
            _is_number(v) and isinstance(v, int) and 0 <= v < 1 << 32 for v in items):
        per_layer = " (or a list of them, one per layer)" if key in _PER_LAYER_KEYS else ""
        raise _hparam_error(h, key, f"must be an integer from 0 to 2**32-1{per_layer}",
                            aborts=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_experts(h: GGUFHeader) -> None:
    n_expert = h.arch_value("expert_count") or 0
    used = _largest(h.arch_value("expert_used_count"))
    groups = h.arch_value("expert_group_count") or 0
    group_used = h.arch_value("expert_group_used_count") or 0
    if n_expert > MAX_EXPERTS:
        raise _hparam_error(h, "expert_count", f"must be at most {MAX_EXPERTS}")
    none = "must be 0 when the model has no experts (expert_count = 0)"
    if used > n_expert or (n_expert and not used):
        raise _hparam_error(h, "expert_used_count",
                            f"must be 1 to expert_count ({n_expert})" if n_expert else none)
    if groups >= max(n_expert, 1):
        raise _hparam_error(h, "expert_group_count",
                            f"must be below expert_count ({n_expert})" if n_expert else none)
    if groups > 1 and n_expert % groups:
        raise _hparam_error(h, "expert_group_count", f"must divide expert_count ({n_expert})")
    if groups > 1 and not 0 < group_used < groups:
        raise _hparam_error(h, "expert_group_used_count",
                            f"must be 1 to expert_group_count - 1 ({groups - 1})")


def _check_head_dims(h: GGUFHeader) -> None:
    """For architectures whose graph asserts it: K, V (and rope) head sizes agree, with
    llama.cpp's defaults (n_embd / n_head of the first layer, rope = K); and a rope dimension
    count, where there is one, is even and fits the head (ggml's rope op asserts both)."""
    if h.architecture not in SAME_HEAD_DIMS and h.arch_value("rope.dimension_count") is None:
        return
    n_head = _per_layer(h.arch_value("attention.head_count"), 1, 0)[0]
    if not n_head:
        return  # llama.cpp then sets them all to 0
    width = int(h.arch_value("embedding_length") or 0) // n_head
    k = h.arch_value("attention.key_length", width)  # an explicit 0 counts, as in llama.cpp
    v = h.arch_value("attention.value_length", width)
    rot = h.arch_value("rope.dimension_count", k)
    with_rope = h.architecture in SAME_HEAD_AND_ROPE_DIMS
    if h.architecture in SAME_HEAD_DIMS and k != v or (with_rope and rot != k):
        what = "key_length, value_length and rope.dimension_count" if with_rope else \
            "key_length and value_length"
        raise ModelLoadError(h.path, f"{h.architecture} needs equal head sizes {what} (here "
                                     f"{k}, {v}{f', {rot}' if with_rope else ''}; llama.cpp's "
                                     f"{h.architecture} graph would abort the process); "
                                     f"{_REDOWNLOAD}")
    if (with_rope or h.arch_value("rope.dimension_count") is not None) and (rot % 2 or rot > k):
        raise ModelLoadError(h.path, f"{h.architecture}: the rope dimension count ({rot}) must be "
                                     f"even and at most the head size ({k}); ggml's rope would "
                                     f"abort the process; {_REDOWNLOAD}")


def _hparam_error(h: GGUFHeader, key: str, rule: str, *, aborts: bool = True) -> ModelLoadError:
    shown = _shown(h.arch_value(key))
    why = " (llama.cpp would abort the process on it)" if aborts else ""
    return ModelLoadError(h.path, f"metadata key '{h.architecture}.{key}' = {shown} {rule}"
                                  f"{why}; {_REDOWNLOAD}")


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


def _as_header(header: GGUFHeader | str | os.PathLike[str]) -> GGUFHeader:
    return header if isinstance(header, GGUFHeader) else read_header(header)


def _n_vocab(h: GGUFHeader) -> int:
    kept = h.metadata.get(_TOKENS)
    return h.array_lengths.get(_TOKENS, len(kept) if isinstance(kept, list) else 0)


def _largest(value: Any) -> int:
    """A count that is one number or one per layer (expert_used_count): the largest."""
    return max(map(int, value), default=0) if isinstance(value, list) else int(value or 0)


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
    n_used = _largest(h.arch_value("expert_used_count"))
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
    block, type_size = GGML_QUANT_SIZES[kv_types.ggml_type(kv_type)]
    return -(-n_elements // block) * type_size


def _pad256(n: int) -> int:
    return -(-n // 256) * 256


def memory_breakdown(header: GGUFHeader | str | os.PathLike[str], n_ctx: int,
                     kv_type: str = "f16", n_seq: int = 1, *, n_ubatch: int = 512,
                     swa_full: bool = True, n_outputs: int | None = None) -> MemoryEstimate:
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
      n_head x head_dim) + the graph's output row per sequence (n_vocab x 4 B each) + the logits
      buffer (n_vocab x 4 B per row: one row per sequence, or ``n_outputs`` rows, as the
      backend sets n_outputs_max; llama.cpp grows it to that when a step drafts) + 1 MiB graph
      overhead.
      Assumes flash attention, which llama.cpp's "auto" picks on CPU.
    Not modelled: MLA (DeepSeek) caches, recurrent-state layers.
    """
    if kv_type.lower() not in kv_types.KV_CACHE_TYPES:
        raise ConfigError(f"kv_type must be one of {', '.join(kv_types.KV_CACHE_TYPES)}, "
                          f"got {kv_type!r}")
    if n_ctx < 1 or n_seq < 1 or n_ubatch < 1:
        raise ConfigError(f"need n_ctx, n_seq and n_ubatch >= 1 (got {n_ctx}, {n_seq}, {n_ubatch})")
    if n_outputs is not None and n_outputs < 1:
        raise ConfigError(f"need n_outputs >= 1 (got {n_outputs})")
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
    n_used = _largest(h.arch_value("expert_used_count"))
    widest = max(att.n_embd, n_ff, n_used * n_ff_exp, max(att.n_head, default=0) * att.head_dim_k)
    mask_cells = cells + (cells_swa if any(att.is_swa) and not all(att.is_swa) else 0)
    compute = (n_ubatch * mask_cells * 2 + 16 * n_ubatch * widest
               + _n_vocab(h) * 4 * (n_seq + (n_outputs or n_seq)) + MiB)
    return MemoryEstimate(sum(t.n_bytes for t in h.tensors), kv, compute, cells)


def estimate_memory(header: GGUFHeader | str | os.PathLike[str], n_ctx: int,
                    kv_type: str = "f16", n_seq: int = 1, **options: Any) -> int:
    """Bytes to load the model with ``n_ctx`` tokens of context per sequence (see
    ``memory_breakdown`` for the formula and ``options``)."""
    return memory_breakdown(header, n_ctx, kv_type, n_seq, **options).total
