"""Reliability under hostile input: mutated GGUF files and hostile models.toml, counted.

    .venv/bin/python benchmarks/reliability.py --short                 # CI size
    .venv/bin/python benchmarks/reliability.py --files 10000 --configs 2000
    .venv/bin/python benchmarks/reliability.py --sections files --files 500 --workers 1

Sections (each a function returning a typed report; other sections may be added beside them):

- ``files``: mutated copies of real seeds (the starter model, the packaged chat model, tiny Qwen2
  and Qwen3-MoE models). Every file goes through ``gguf_header.read_header`` in this process,
  under a time limit; every file it accepts is loaded by the real llama.cpp in a child process
  (``load(path, n_ctx=64)`` then one ``complete(max_tokens=1)``), so a crash or a hang is caught
  and counted instead of killing the run. Prints files fuzzed, accepted, rejected by reason,
  crashes, hangs and seconds.
- ``oracle``: ``gguf.GGUFReader`` against the header walker on every seed (keys, values,
  tensors, offsets).
- ``configs``: generated models.toml documents (random types, unknown keys, huge numbers,
  unicode, hostile paths and names) through ``config.load_config``; prints how many were
  accepted, rejected by key, and any exception that was not a ``ConfigError`` naming the file.

- ``load`` and ``soak``: requests under load and resources over a soak, from
  ``benchmarks/load_soak.py`` (threads and cancelled asyncio streams on shared models, then mixed
  requests on one model: RSS, threads and file descriptors before and after).

Why mutated files stay small: the starter is 253 MB. A mutant is its (mutated) header followed
by a *sparse* tensor-data section of the original length: the file has the real size, so
"tensor data past the end" checks are still meaningful, but it costs a few MB of disk and the
weights read as zeros. Tiny models are mutated whole, tensor data included.
The numbers are printed, never asserted: the tests (``tests/test_fuzz_gguf.py``,
``tests/test_fuzz_config.py``) assert on a short run of the same code.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import queue
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# --- GGUF seeds in editable form --------------------------------------------------------------
# A seed is parsed once into key-value records (raw bytes plus where each field sits) and tensor
# records; ``layout`` writes it back byte for byte, so a mutation edits one field (in place) or
# one record (then the layout is recomputed and stays consistent).

STRING, ARRAY = 8, 9
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
               10: "<Q", 11: "<q", 12: "<d"}
_ITEM_SAMPLE = 256  # string-array items whose fields are recorded as mutation targets


@dataclass(frozen=True)
class KV:
    """One key-value record: its raw bytes and its fields as (kind, offset in raw, size)."""
    key: str
    vtype: int
    raw: bytes
    parts: tuple[tuple[str, int, int], ...]
    item_type: int | None = None
    count: int = 0


@dataclass(frozen=True)
class Tensor:
    name: bytes
    dims: tuple[int, ...]
    ggml_type: int
    data: bytes | None  # None: zeros (a big seed's weights are not kept)

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.dims, self.ggml_type)


@dataclass(frozen=True)
class Seed:
    name: str
    version: int
    kvs: tuple[KV, ...]
    tensors: tuple[Tensor, ...]
    alignment: int
    whole: bool  # tensor data kept (tiny models): mutants include real weights

    @property
    def architecture(self) -> str:
        return next((_string_value(kv) for kv in self.kvs if kv.key == "general.architecture"),
                    "")


def tensor_bytes(dims: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor as ggml counts them (0 for a type the gguf package does not know)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return 0
    return math.prod(dims) // block * size


def _string_value(kv: KV) -> str:
    (n,) = struct.unpack_from("<Q", kv.raw, 8 + len(kv.key.encode()) + 4)
    return kv.raw[-n:].decode("utf-8", "replace") if n else ""


class _Reader:
    """Forward reads over a seed: the seeds are valid files, so no checks beyond struct's."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def blob(self) -> bytes:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])


def _read_kv(r: _Reader, rng: random.Random) -> KV:
    start = r.pos
    parts = [("key_len", 0, 8)]
    key = r.blob()
    parts += [("key", 8, len(key)), ("value_type", r.pos - start, 4)]
    vtype, item_type, count = r.take("<I"), None, 0
    if vtype == ARRAY:
        parts.append(("array_type", r.pos - start, 4))
        item_type = r.take("<I")
        parts.append(("array_count", r.pos - start, 8))
        count = r.take("<Q")
        if item_type == STRING:
            sample = set(rng.sample(range(count), min(count, _ITEM_SAMPLE)))
            for i in range(count):
                at = r.pos - start
                n = len(r.blob())
                if i in sample:
                    parts += [("item_len", at, 8), ("item", at + 8, n)]
        else:
            size = struct.calcsize(_SCALAR_FMT[item_type]) * count
            parts.append(("array_items", r.pos - start, size))
            r.pos += size
    elif vtype == STRING:
        parts.append(("str_len", r.pos - start, 8))
        n = len(r.blob())
        parts.append(("str", r.pos - start - n, n))
    else:
        size = struct.calcsize(_SCALAR_FMT[vtype])
        parts.append(("value", r.pos - start, size))
        r.pos += size
    return KV(key.decode("utf-8", "replace"), vtype, bytes(r.buf[start:r.pos]), tuple(parts),
              item_type, count)


def read_seed(path: Path, name: str | None = None, *, whole: bool | None = None) -> Seed:
    """Parse a valid GGUF file into a seed (``whole``: keep tensor data; default for < 8 MB)."""
    data = path.read_bytes() if path.stat().st_size < 8 << 20 else None
    whole = data is not None if whole is None else whole
    if data is None:
        with open(path, "rb") as fh:  # headers are a few MB (the starter's 6.5: 262k tokens)
            data = fh.read(16 << 20)
    r, rng = _Reader(data), random.Random(0)
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kvs = tuple(_read_kv(r, rng) for _ in range(n_kv))
    infos = []
    for _ in range(n_tensors):
        tname = r.blob()
        dims = tuple(r.take("<Q") for _ in range(r.take("<I")))
        infos.append((tname, dims, r.take("<I"), r.take("<Q")))
    alignment = next((struct.unpack_from("<I", kv.raw, len(kv.raw) - 4)[0] for kv in kvs
                      if kv.key == "general.alignment"), 32)
    data_start = -(-r.pos // alignment) * alignment
    tensors = tuple(Tensor(n, d, t, data[data_start + off:data_start + off + tensor_bytes(d, t)]
                           if whole else None) for n, d, t, off in infos)
    return Seed(name or path.stem, version, kvs, tensors, alignment, whole)


@dataclass
class Image:
    """A file to write: ``head`` (header and padding), then tensor data, at ``size`` bytes."""
    head: bytearray
    data: bytes | None
    size: int
    parts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def copy(self) -> Image:
        return Image(bytearray(self.head), self.data, self.size, self.parts)

    def write(self, path: Path) -> None:
        with open(path, "wb") as fh:
            fh.write(self.head)
            if self.data:
                fh.write(self.data)
            fh.truncate(self.size)  # extends sparsely (zeros), or cuts a truncation mutant


_MAX_FILL = 64 << 20


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def layout(seed: Seed) -> Image:
    """The seed as file bytes, every field's position recorded by kind."""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", seed.version, len(seed.tensors), len(seed.kvs)))
    parts: dict[str, list[tuple[int, int]]] = {"magic": [(0, 4)], "version": [(4, 4)],
                                               "n_tensors": [(8, 8)], "n_kv": [(16, 8)]}

    def add(kind: str, blob: bytes) -> None:
        parts.setdefault(kind, []).append((len(head), len(blob)))
        head.extend(blob)

    for kv in seed.kvs:
        base = len(head)
        head.extend(kv.raw)
        for kind, rel, size in kv.parts:
            parts.setdefault(kind, []).append((base + rel, size))
    offset, chunks = 0, []
    for t in seed.tensors:
        add("tensor_name_len", struct.pack("<Q", len(t.name)))
        add("tensor_name", t.name)
        add("n_dims", struct.pack("<I", len(t.dims)))
        for d in t.dims:
            add("dim", struct.pack("<Q", d))
        add("ggml_type", struct.pack("<I", t.ggml_type))
        add("tensor_offset", struct.pack("<Q", offset % (1 << 64)))
        padded = _pad(t.n_bytes, seed.alignment)
        if seed.whole:  # an absurd size is not materialized: the file is then just short
            body = (t.data or b"")[:t.n_bytes]
            chunks.append(body + bytes(max(0, min(padded, _MAX_FILL) - len(body))))
        offset += padded
    if seed.tensors:
        add("padding", bytes(_pad(len(head), seed.alignment) - len(head)))
    data = b"".join(chunks) if seed.whole else None
    size = len(head) + (len(data) if data is not None and len(data) < offset else offset)
    return Image(head, data, size, parts)


# --- mutations --------------------------------------------------------------------------------
# Each mutator takes (seed, its image, rng) and returns (label, mutant image). In-place ones edit
# one field of the image; structural ones edit the seed and lay it out again.

HUGE = (2**63 - 1, 2**63, 2**64 - 1, 2**62, 2**32, 2**31, 2**30 + 1)
_INTS = {1: (0, 1, 2, 0x7F, 0x80, 0xFF), 2: (0, 1, 0x7FFF, 0x8000, 0xFFFF),
         4: (0, 1, 2, 3, 5, 6, 7, 513, 1025, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF),
         8: (0, 1, 2, 513, 0xFFFFFFFF) + HUGE}
_FLOATS = (0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45, 3.4e38)
_VALID_TYPES = tuple(int(t) for t in GGMLQuantizationType)
_HPARAMS = ("block_count", "embedding_length", "feed_forward_length", "context_length",
            "attention.head_count", "attention.head_count_kv", "attention.key_length",
            "attention.value_length", "attention.layer_norm_rms_epsilon", "rope.freq_base",
            "rope.dimension_count", "rope.scaling.type", "attention.sliding_window",
            "expert_count", "expert_used_count", "expert_feed_forward_length",
            "expert_group_count", "expert_group_used_count", "nextn_predict_layers")
_TOKEN_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
               "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
               "tokenizer.ggml.model", "tokenizer.ggml.pre", "general.architecture",
               "tokenizer.ggml.add_bos_token")


def _pick_part(img: Image, rng: random.Random, kinds: tuple[str, ...] | None = None
               ) -> tuple[str, int, int]:
    """A field of the image: a kind chosen uniformly, then one field of that kind."""
    choices = [k for k in (kinds or tuple(img.parts)) if img.parts.get(k)]
    kind = rng.choice(choices)
    start, size = rng.choice(img.parts[kind])
    return kind, start, size


def _set_int(img: Image, start: int, size: int, value: int) -> Image:
    out = img.copy()
    out.head[start:start + size] = (value % (1 << 8 * size)).to_bytes(size, "little")
    return out


def mutate_bitflip(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    kind, start, size = _pick_part(img, rng)
    out = img.copy()
    for _ in range(rng.randint(1, 3)):
        if size:
            at = start + rng.randrange(size)
            out.head[at] ^= 1 << rng.randrange(8)
    return f"bitflip:{kind}", out


def mutate_anywhere(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """Random bytes anywhere (tensor data included for whole seeds)."""
    whole = bytearray(img.head + (img.data or b""))
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(whole))
        whole[at] = rng.randrange(256)
    return "bytes:anywhere", Image(whole, None, img.size if img.data is None else len(whole))


def mutate_truncate(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """Cut the file at a field boundary (or inside one, or inside the tensor data)."""
    out = img.copy()
    if rng.random() < 0.15:
        out.size = len(img.head) + rng.randrange(max(1, img.size - len(img.head)))
        return "truncate:data", out
    kind, start, size = _pick_part(img, rng)
    out.size = rng.choice((start, start + size, start + size // 2))
    return f"truncate:{kind}", out


def mutate_huge(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    kind, start, size = _pick_part(img, rng, ("n_kv", "n_tensors", "key_len", "str_len",
                                              "array_count", "item_len", "tensor_name_len",
                                              "dim"))
    remaining = img.size - start - size
    return f"huge:{kind}", _set_int(img, start, size, rng.choice(HUGE + (remaining + 1,)))


def mutate_value_type(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    kind, start, size = _pick_part(img, rng, ("value_type", "array_type"))
    value = rng.choice(tuple(range(13)) + (13, 99, 2**31, 2**32 - 1))
    return f"type:{kind}", _set_int(img, start, size, value)


def mutate_tensor_field(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """n_dims, a dimension, the ggml type or the data offset of one tensor, in place."""
    kind, start, size = _pick_part(img, rng, ("n_dims", "dim", "ggml_type", "tensor_offset"))
    old = int.from_bytes(img.head[start:start + size], "little")
    values = {"n_dims": (0, 5, 8, 2**32 - 1, old + 1, max(old - 1, 0)),
              "dim": (0, 2**62, 2**63, 2**64 - 1, old * 2, old + 1),
              "ggml_type": (4, 5, 31, 36, 42, 43, 99, 2**31, rng.choice(_VALID_TYPES)),
              "tensor_offset": (0, old + 1, old + seed.alignment - 1, old + seed.alignment,
                                max(old - seed.alignment, 0), 2**63, 2**64 - 1,
                                img.size - len(img.head), img.size)}[kind]
    return f"tensor:{kind}", _set_int(img, start, size, rng.choice(values))


def mutate_swap_offsets(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    offsets = img.parts.get("tensor_offset", [])
    if len(offsets) < 2:
        return mutate_bitflip(seed, img, rng)
    (a, _), (b, _) = rng.sample(offsets, 2)
    out = img.copy()
    out.head[a:a + 8], out.head[b:b + 8] = img.head[b:b + 8], img.head[a:a + 8]
    return "tensor:swap_offsets", out


def mutate_value(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """A scalar value (an array's items too) set to an edge value of its width."""
    kind, start, size = _pick_part(img, rng, ("value", "array_items"))
    width = rng.choice((1, 2, 4, 8)) if kind == "array_items" else size
    if size < width:
        return mutate_bitflip(seed, img, rng)
    at = start + rng.randrange(size - width + 1) // width * width
    out = img.copy()
    if rng.random() < 0.3 and width in (4, 8):
        out.head[at:at + width] = struct.pack("<f" if width == 4 else "<d", rng.choice(_FLOATS))
    else:
        out.head[at:at + width] = (rng.choice(_INTS[width]) % (1 << 8 * width)).to_bytes(
            width, "little")
    return f"value:{kind}", out


def encode_kv(key: str | bytes, vtype: int, value: Any, item_type: int | None = None) -> KV:
    """A key-value record from Python values (``value`` a list for arrays)."""
    kb = key.encode() if isinstance(key, str) else key
    raw = bytearray(struct.pack("<Q", len(kb)) + kb + struct.pack("<I", vtype))

    def one(t: int, v: Any) -> bytes:
        if t == STRING:
            b = v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v)
            return struct.pack("<Q", len(b)) + b
        fmt = _SCALAR_FMT[t]
        return struct.pack(fmt, v) if fmt[-1] in "fd" else struct.pack(
            fmt.upper() if fmt[-1] in "bhiq" else fmt, v % (1 << 8 * struct.calcsize(fmt)))

    if vtype == ARRAY:
        raw += struct.pack("<IQ", item_type, len(value))
        for v in value:
            raw += one(item_type, v)
    else:
        raw += one(vtype, value)
    return KV(kb.decode("utf-8", "replace"), vtype, bytes(raw), (), item_type,
              len(value) if vtype == ARRAY else 0)


def rename_kv(kv: KV, key: str) -> KV:
    """The record under another key (value bytes unchanged)."""
    old = 8 + len(kv.key.encode())
    new = key.encode()
    return replace(kv, key=key, raw=struct.pack("<Q", len(new)) + new + kv.raw[old:], parts=())


def as_architecture(seed: Seed, arch: str) -> Seed:
    """The seed relabelled as ``arch``: general.architecture and every "<old>." key renamed."""
    old = seed.architecture + "."
    kvs = tuple(encode_kv(kv.key, STRING, arch) if kv.key == "general.architecture"
                else rename_kv(kv, arch + "." + kv.key[len(old):]) if kv.key.startswith(old)
                else kv for kv in seed.kvs)
    return replace(seed, kvs=kvs)


_ARCHES = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma3", "gemma2", "phi3",
           "deepseek2", "gpt2", "bert", "mamba", "rwkv6", "t5", "falcon", "olmoe", "gpt-oss",
           "starcoder2", "command-r", "minicpm")


def mutate_architecture(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """Another architecture's loader and graph on these tensors and hyperparameters."""
    arch = rng.choice(_ARCHES)
    return f"arch:{arch}", layout(as_architecture(seed, arch))


def _with_kv(seed: Seed, kv: KV) -> Seed:
    """The seed with ``kv`` replacing the record of the same key (or added at the end)."""
    kvs = [k for k in seed.kvs if k.key != kv.key]
    at = next((i for i, k in enumerate(seed.kvs) if k.key == kv.key), len(kvs))
    kvs.insert(at, kv)
    alignment = seed.alignment
    if kv.key == "general.alignment" and kv.vtype == 4:
        (a,) = struct.unpack_from("<I", kv.raw, len(kv.raw) - 4)
        alignment = a if a and not a & (a - 1) and a <= 1 << 16 else seed.alignment
    return replace(seed, kvs=tuple(kvs), alignment=alignment)


def _hostile_kv(seed: Seed, rng: random.Random) -> tuple[str, KV]:
    arch = seed.architecture
    key = rng.choice([f"{arch}.{h}" for h in _HPARAMS] + list(_TOKEN_KEYS)
                     + ["general.alignment"] * 3)
    short = key.removeprefix(arch + ".")
    r = rng.random()
    if key == "general.alignment":
        vtype = rng.choice((4, 4, 4, 4, 2, 10, STRING))
        kv = encode_kv(key, vtype, "32" if vtype == STRING else
                       rng.choice((0, 1, 3, 8, 64, 256, 4096, 2**31)))
    elif short in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "general.architecture",
                   "rope.scaling.type"):
        kv = encode_kv(key, STRING, rng.choice((
            "", "\0", "llama", "gpt2", "bert", "rwkv", "t5", "plamo2", "whitespace", "hybriddna",
            "no_vocab", "qwen3moe", "yarn", "longrope", "none", "bogus", "x" * 300)))
    elif r < 0.6:
        kv = encode_kv(key, rng.choice((4, 5, 10, 11)), rng.choice(_INTS[4] + (2**63, 2**64 - 1)))
    elif r < 0.75:
        kv = encode_kv(key, 6, rng.choice(_FLOATS))
    elif r < 0.9:
        n = rng.choice((0, 1, 3, 64, 513))
        kv = encode_kv(key, ARRAY, [rng.choice(_INTS[4]) for _ in range(n)], 4)
    else:
        vtype = rng.choice((STRING, 7))
        kv = encode_kv(key, vtype, "12" if vtype == STRING else rng.choice((0, 1, 2)))
    return short, kv


def mutate_set_kv(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """A hyperparameter, tokenizer or alignment key set to a hostile value or type."""
    short, kv = _hostile_kv(seed, rng)
    return f"set:{short}", layout(_with_kv(seed, kv))


def mutate_records(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """Whole records: a key dropped, duplicated, emptied, nested arrays, unknown types."""
    kvs = list(seed.kvs)
    what = rng.choice(("drop", "duplicate", "empty_key", "nested_array", "unknown_type",
                       "trim_array"))
    if what == "drop":
        kvs.pop(rng.randrange(len(kvs)))
    elif what == "duplicate":
        kvs.append(rng.choice(kvs))
    elif what == "empty_key":
        kvs.append(encode_kv("", 4, 1))
    elif what == "nested_array":
        raw = encode_kv("x.nested", ARRAY, [], ARRAY).raw
        kvs.append(KV("x.nested", ARRAY, raw + struct.pack("<IQ", 4, 0), (), ARRAY, 1))
    elif what == "unknown_type":
        kvs.append(KV("x.bad", 13, encode_kv("x.bad", 4, 0).raw[:-8] + struct.pack("<II", 13, 0),
                      ()))
    else:
        arrays = [i for i, k in enumerate(kvs) if k.vtype == ARRAY]
        if not arrays:
            return mutate_bitflip(seed, img, rng)
        i = rng.choice(arrays)
        kvs[i] = _trim_array(kvs[i], rng.choice((0, 1, kvs[i].count // 2, kvs[i].count - 1)))
    return f"kv:{what}", layout(replace(seed, kvs=tuple(kvs)))


def _array_items(kv: KV) -> list[bytes]:
    """The items of a string-array record, as bytes."""
    r = _Reader(kv.raw)
    r.pos = 8 + len(kv.key.encode()) + 4 + 4 + 8
    return [r.blob() for _ in range(kv.count)]


def _trim_array(kv: KV, keep: int) -> KV:
    """The array record with only its first ``keep`` items."""
    r = _Reader(kv.raw)
    r.pos = 8 + len(kv.key.encode()) + 4 + 4 + 8
    if kv.item_type == STRING:
        for _ in range(keep):
            r.blob()
    else:
        r.pos += struct.calcsize(_SCALAR_FMT[kv.item_type]) * keep
    head = bytearray(kv.raw[:r.pos])
    at = 8 + len(kv.key.encode()) + 4 + 4
    head[at:at + 8] = struct.pack("<Q", keep)
    return replace(kv, raw=bytes(head), parts=(), count=keep)


def mutate_tensors(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """Tensor records changed with a consistent layout: shapes, types, names, counts."""
    tensors = list(seed.tensors)
    i = rng.randrange(len(tensors))
    t = tensors[i]
    what = rng.choice(("shape", "type", "rename", "drop", "extra", "five_dims"))
    if what == "shape":
        dims = list(t.dims)
        j = rng.randrange(len(dims))
        dims[j] = rng.choice((0, 1, dims[j] * 2, dims[j] + 1, dims[j] // 2))
        if len(dims) > 1 and rng.random() < 0.3:
            dims.reverse()
        tensors[i] = replace(t, dims=tuple(dims))
    elif what == "type":
        tensors[i] = replace(t, ggml_type=rng.choice(_VALID_TYPES))
    elif what == "rename":
        name = rng.choice((b"", b"x" * 64, b"x" * 63, tensors[i - 1].name, b"\xff\xfe",
                           b"blk.999.attn_q.weight", b"../../etc/passwd"))
        tensors[i] = replace(t, name=name)
    elif what == "drop":
        tensors.pop(i)
    elif what == "extra":
        tensors.append(replace(t, name=b"extra." + t.name[:40]))
    else:
        tensors[i] = replace(t, dims=t.dims + (1,) * (5 - len(t.dims)))
    return f"tensors:{what}", layout(replace(seed, tensors=tuple(tensors)))


def mutate_layout(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """The version field, or the data section shifted off its alignment."""
    out = img.copy()
    if rng.random() < 0.5:
        value = rng.choice((0, 1, 2, 3, 4, 0x03000000, 2**32 - 1))
        return "layout:version", _set_int(img, 4, 4, value)
    shift = rng.choice((-1, 1))
    if shift > 0:
        out.head += b"\0"
    elif out.parts.get("padding") and out.parts["padding"][0][1]:
        del out.head[-1]
    else:
        out.head += bytes(seed.alignment - 1)
    out.size += shift
    return "layout:misaligned_data", out


def mutate_data(seed: Seed, img: Image, rng: random.Random) -> tuple[str, Image]:
    """NaN, infinity and garbage in the tensor data (whole seeds only)."""
    if not img.data:
        return mutate_bitflip(seed, img, rng)
    data = bytearray(img.data)
    for _ in range(rng.randint(1, 64)):
        at = rng.randrange(len(data) - 4) // 4 * 4
        data[at:at + 4] = rng.choice((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff",
                                      b"\x00\x7c\x00\x7c", os.urandom(4)))
    out = img.copy()
    out.data = bytes(data)
    return "data:nan_inf", out


MUTATORS: tuple[Callable[[Seed, Image, random.Random], tuple[str, Image]], ...] = (
    mutate_bitflip, mutate_bitflip, mutate_anywhere, mutate_truncate, mutate_huge,
    mutate_value_type, mutate_tensor_field, mutate_swap_offsets, mutate_value, mutate_set_kv,
    mutate_set_kv, mutate_records, mutate_tensors, mutate_layout, mutate_data,
    mutate_architecture)


def mutants(seeds: list[Seed], n: int, rng: random.Random,
            weights: list[float] | None = None) -> Iterator[tuple[Seed, str, Image]]:
    """``n`` (seed, label, image) mutants, seeds drawn by ``weights``."""
    images = {s.name: layout(s) for s in seeds}
    for _ in range(n):
        seed = rng.choices(seeds, weights)[0]
        label, img = rng.choice(MUTATORS)(seed, images[seed.name], rng)
        yield seed, label, img


# --- header checks, in this process, under a time limit ----------------------------------------

class HeaderTimeout(Exception):
    """read_header ran past its time limit (a hang, counted)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise HeaderTimeout in the main thread after ``seconds`` (Python loops are interruptible)."""
    def expire(signum: int, frame: Any) -> None:
        raise HeaderTimeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass(frozen=True)
class HeaderVerdict:
    outcome: str  # "accepted", "rejected", "bug" (another exception), "hang"
    detail: str
    seconds: float


def check_header(path: Path, limit_s: float = 10.0) -> HeaderVerdict:
    """Run the validator on one file, and on an accepted one the inspection that reads its
    header (``describe``, ``memory_breakdown``): accepted, rejected (ModelLoadError naming the
    file), a bug (any other exception, or a rejection that does not name the file) or a hang."""
    from tongyi_local.errors import ModelLoadError
    from tongyi_local.gguf_header import describe, memory_breakdown, read_header

    started = time.perf_counter()
    try:
        with time_limit(limit_s):
            header = read_header(path)
            describe(header)  # what `models info` and the pool's fit check read
            memory_breakdown(header, 64)
        outcome, detail = "accepted", ""
    except HeaderTimeout as exc:
        outcome, detail = "hang", str(exc)
    except ModelLoadError as exc:
        named = exc.path == str(path) and str(path) in str(exc) and exc.reason
        outcome, detail = ("rejected", exc.reason) if named else ("bug", f"unnamed: {exc}")
    except Exception as exc:  # noqa: BLE001 - anything else is what we are looking for
        outcome, detail = "bug", f"{type(exc).__name__}: {exc}"
    return HeaderVerdict(outcome, detail, time.perf_counter() - started)


def reason_group(reason: str) -> str:
    """A rejection reason with its particulars (names, values, numbers) blanked, and the
    advice every reason ends with dropped, for counting."""
    reason = reason.split("; the file is corrupt")[0].split("; download it again")[0]
    reason = re.sub(r"'(?:[^'\\]|\\.)*'(?:\.\.\.)?|\"(?:[^\"\\]|\\.)*\"", "'…'", reason)
    reason = re.sub(r" = .*? (must|is) ", r" = … \1 ", reason)
    return re.sub(r"\b\d+\b", "N", reason)


# --- the oracle: gguf.GGUFReader on valid files --------------------------------------------------

def reader_differences(path: Path) -> list[str]:
    """Where ``read_header`` and ``gguf.GGUFReader`` disagree on ``path``: keys, kept values,
    lengths of the values not kept, the data offset, and every tensor's name, shape, type,
    offset, size and element count."""
    import gguf

    from tongyi_local import gguf_header

    header, reader = gguf_header.read_header(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    ours = set(header.metadata) | set(header.array_lengths)
    diffs = [] if ours == set(fields) else [
        f"keys: only ours {sorted(ours - set(fields))}, only theirs {sorted(set(fields) - ours)}"]
    for key, f in fields.items():
        if key in header.array_lengths and header.array_lengths[key] != len(f.data):
            diffs.append(f"{key}: length {header.array_lengths[key]} != {len(f.data)}")
        elif key in header.metadata and not _same(header.metadata[key], f.contents()):
            diffs.append(f"{key}: {header.metadata[key]!r} != {f.contents()!r}")
    if header.data_offset != reader.data_offset:
        diffs.append(f"data offset {header.data_offset} != {reader.data_offset}")
    theirs = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, t.data_offset,
               t.n_bytes, t.n_elements) for t in reader.tensors]
    mine = [(t.name, t.shape, t.type, header.data_offset + t.offset, t.n_bytes, t.n_elements)
            for t in header.tensors]
    if mine != theirs:
        diffs.append(f"tensors differ: {len(mine)} vs {len(theirs)}, first difference "
                     f"{next((p for p in zip(mine, theirs) if p[0] != p[1]), None)}")
    return diffs


def _same(a: Any, b: Any) -> bool:
    """Equal values, NaN equal to NaN, a bool only equal to a bool."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and isinstance(a, bool) == isinstance(b, bool)


# --- loads, in child processes -----------------------------------------------------------------
# One long-lived child loads file after file (no interpreter start per file); when it dies the
# file it was loading is retried in a fresh child, so a crash is confirmed and attributed.

CHILD_MEMORY_LIMIT = 6 << 30  # address space: a runaway allocation fails instead of the machine


def _load_worker(conn: Any, stderr_path: str) -> None:
    """Child loop: receive a path, load it, generate one token, send back the outcome.

    Its stderr goes to ``stderr_path`` (where an abort message lands); ggml's abort handler
    must not attach gdb for a backtrace (seconds per crash)."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT, CHILD_MEMORY_LIMIT))
    os.environ["GGML_NO_BACKTRACE"] = "1"
    log = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 2)
    import tongyi_local
    from tongyi_local.errors import TongyiError

    while (path := conn.recv()) is not None:
        try:
            with tongyi_local.load(path, n_ctx=64, slots=1, threads=1, batch_threads=1) as model:
                model.complete("Hello", max_tokens=1, temperature=0)
            outcome = ("loaded", "")
        except TongyiError as exc:
            outcome = ("error", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - not ours to raise: counted as a bug
            outcome = ("bug", f"{type(exc).__name__}: {exc}")
        conn.send(outcome)


class Loader:
    """A child process that loads files; ``load`` returns (outcome, detail)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        fd, self._stderr = tempfile.mkstemp(prefix="fuzz-loader-", suffix=".log")
        os.close(fd)
        self._proc = ctx.Process(target=_load_worker, args=(child, self._stderr), daemon=True)
        self._proc.start()
        child.close()

    def _last_words(self) -> str:
        """The child's last stderr line that says why it died (an assert, a terminate)."""
        try:
            lines = Path(self._stderr).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        why = [ln for ln in lines if re.search(r"GGML_ASSERT|terminate|error|abort|what\(\)", ln)]
        return (why or lines or [""])[-1].strip()[-300:]

    def load(self, path: Path, timeout_s: float) -> tuple[str, str]:
        """("loaded"|"error"|"bug", detail), ("crash", signal or exit code) or ("hang", "")."""
        try:
            self._conn.send(str(path))
            if self._conn.poll(timeout_s):
                return self._conn.recv()
            hung = True
        except (EOFError, OSError):  # the child closed the pipe: it is dying
            hung = False
        self._proc.join(None if not hung else 0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
            return "hang", f"no answer within {timeout_s:.0f} s"
        code = self._proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        return "crash", f"{how}: {self._last_words()}"

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()
        Path(self._stderr).unlink(missing_ok=True)


class LoaderPool:
    """``workers`` loaders; a dead or hung one is replaced and its file retried once alone."""

    def __init__(self, workers: int) -> None:
        self._idle: queue.SimpleQueue[Loader] = queue.SimpleQueue()
        self._workers = workers
        for _ in range(workers):
            self._idle.put(Loader())

    def load_all(self, jobs: list[tuple[Path, float]]) -> list[tuple[str, str]]:
        """Outcomes in ``jobs`` order, ``workers`` loads at a time (the threads only wait on
        the children, which do the work)."""
        def run(job: tuple[Path, float]) -> tuple[str, str]:
            loader = self._idle.get()
            try:
                outcome, loader = _confirmed(loader, *job)
            finally:
                self._idle.put(loader)
            return outcome

        with ThreadPoolExecutor(self._workers) as pool:
            return list(pool.map(run, jobs))

    def close(self) -> None:
        for _ in range(self._workers):
            self._idle.get().close()


def _confirmed(loader: Loader, path: Path, timeout_s: float) -> tuple[tuple[str, str], Loader]:
    """Load ``path``; after a crash or a hang, once more in a fresh child (was it this file, or
    what an earlier file left behind?). Returns the outcome and a live loader."""
    outcome = loader.load(path, timeout_s)
    if outcome[0] not in ("crash", "hang"):
        return outcome, loader
    loader.close()
    loader = Loader()
    if loader.load(path, timeout_s)[0] not in ("crash", "hang"):
        outcome = (outcome[0], outcome[1] + " (not reproduced alone)")
    if not loader.alive:
        loader.close()
        loader = Loader()
    return outcome, loader


# --- the files section ---------------------------------------------------------------------------

@dataclass
class FileReport:
    files: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason group -> count
    header_bugs: list[str] = field(default_factory=list)
    header_hangs: list[str] = field(default_factory=list)
    loads: Counter = field(default_factory=Counter)  # loaded / error / bug / crash / hang
    load_errors: Counter = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    load_bugs: list[str] = field(default_factory=list)
    by_label: Counter = field(default_factory=Counter)  # (label, outcome) -> count
    header_max_s: float = 0.0
    seconds: float = 0.0

    @property
    def crash_count(self) -> int:
        return self.loads["crash"]

    @property
    def hang_count(self) -> int:
        return self.loads["hang"] + len(self.header_hangs)


def seed_files(directory: Path, *, big: bool = True) -> dict[str, Path]:
    """Tiny Qwen2 (f32, f16) and Qwen3-MoE models written to ``directory``, plus the packaged
    chat and starter models (assembled on first use)."""
    from tongyi_local.testing import write_tiny_model

    files = {"tiny-qwen2": write_tiny_model(directory / "qwen2-f32.gguf", "qwen2"),
             "tiny-qwen2-f16": write_tiny_model(directory / "qwen2-f16.gguf", "qwen2",
                                                dtype="f16", n_layer=1),
             "tiny-qwen3moe": write_tiny_model(directory / "qwen3moe.gguf", "qwen3moe")}
    if big:
        from tongyi_local.store import starter_chat_model, starter_model

        files |= {"chat": starter_chat_model(progress=False), "starter": starter_model()}
    return files


def default_seeds(directory: Path, *, big: bool = True) -> list[Seed]:
    return [read_seed(path, name) for name, path in seed_files(directory, big=big).items()]


_LOAD_TIMEOUT_S = {"chat": 60.0, "starter": 120.0}


def fuzz_files(n: int, *, seeds: list[Seed], weights: list[float] | None = None,
               workers: int = 2, rng_seed: int = 0, batch: int = 32,
               directory: Path | None = None, load: bool = True,
               progress: Callable[[FileReport], None] | None = None) -> FileReport:
    """Write ``n`` mutants in batches, check each header here and load the accepted ones in
    child processes. Mutant files are deleted after their batch."""
    report, rng, started = FileReport(), random.Random(rng_seed), time.perf_counter()
    pool = LoaderPool(workers) if load else None
    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-", dir=directory) as tmp:
        stream = mutants(seeds, n, rng, weights)
        try:
            for start in range(0, n, batch):
                chunk = [next(stream) for _ in range(min(batch, n - start))]
                _fuzz_batch(chunk, Path(tmp), start, report, pool)
                if progress:
                    progress(report)
        finally:
            if pool:
                pool.close()
    report.seconds = time.perf_counter() - started
    return report


def _fuzz_batch(chunk: list[tuple[Seed, str, Image]], tmp: Path, start: int,
                report: FileReport, pool: LoaderPool | None) -> None:
    """Write, check and (when accepted) load one batch; keep only the files that found
    something (sparse, so cheap) in ``KEEP_DIR``."""
    jobs: list[tuple[Path, float]] = []
    labels: list[str] = []
    for i, (seed, label, img) in enumerate(chunk):
        path = tmp / f"{start + i:06d}-{seed.name}-{label.replace(':', '-')}.gguf"
        img.write(path)
        if _count_header(report, path, label, check_header(path)):
            jobs.append((path, _LOAD_TIMEOUT_S.get(seed.name, 30.0)))
            labels.append(label)
    if pool and jobs:
        for (path, _), label, outcome in zip(jobs, labels, pool.load_all(jobs)):
            _count_load(report, path, label, outcome)
    for path, _ in jobs:
        path.unlink(missing_ok=True)


def _count_header(report: FileReport, path: Path, label: str, verdict: HeaderVerdict) -> bool:
    """Count the validator's verdict; True when the file goes on to be loaded."""
    report.files += 1
    report.header_max_s = max(report.header_max_s, verdict.seconds)
    report.by_label[(label, verdict.outcome)] += 1
    if verdict.outcome == "accepted":
        report.accepted += 1
        return True
    if verdict.outcome == "rejected":
        report.rejected[reason_group(verdict.detail)] += 1
        path.unlink()
    else:
        found = report.header_hangs if verdict.outcome == "hang" else report.header_bugs
        found.append(f"{path.name}: {verdict.detail}")
        _keep(path)
    return False


def _count_load(report: FileReport, path: Path, label: str, outcome: tuple[str, str]) -> None:
    kind, detail = outcome
    report.loads[kind] += 1
    report.by_label[(label, "load-" + kind)] += 1
    if kind == "error":
        report.load_errors[reason_group(_llama_reason(detail))] += 1
    elif kind != "loaded":
        found = {"crash": report.crashes, "hang": report.hangs}.get(kind, report.load_bugs)
        found.append(f"{path.name}: {detail}")
        _keep(path)


def _llama_reason(detail: str) -> str:
    """What llama.cpp (or the backend) said, without the file name around it."""
    m = re.search(r"error loading model: ([^;]*)", detail)
    return f"{detail.split(':', 1)[0]}: {m.group(1) if m else detail.rsplit(': ', 1)[-1]}"


KEEP_DIR = Path(tempfile.gettempdir()) / "fuzz-gguf-findings"


def _keep(path: Path) -> None:
    """Keep a file that found something (sparse, so cheap) for a reproducer."""
    KEEP_DIR.mkdir(exist_ok=True)
    shutil.move(path, KEEP_DIR / path.name)  # a rename on the same file system


def print_file_report(r: FileReport) -> None:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10
    print(f"\n== files: {r.files} fuzzed in {r.seconds:.0f} s "
          f"(slowest header check {r.header_max_s * 1e3:.0f} ms; peak RSS {own} MiB here, "
          f"{child} MiB in the largest loader)")
    print(f"accepted by the validator: {r.accepted}; rejected: {sum(r.rejected.values())}; "
          f"validator bugs (other exceptions): {len(r.header_bugs)}; validator hangs: "
          f"{len(r.header_hangs)}")
    print(f"loads of accepted files: {dict(r.loads)}; crashes: {r.crash_count}, "
          f"hangs: {r.hang_count}")
    print("rejected by reason:")
    for reason, count in r.rejected.most_common():
        print(f"  {count:6d}  {reason}")
    if r.load_errors:
        print("accepted, then refused by llama.cpp / the backend (clean errors):")
        for reason, count in r.load_errors.most_common(15):
            print(f"  {count:6d}  {reason}")
    for title, items in (("VALIDATOR BUGS", r.header_bugs), ("VALIDATOR HANGS", r.header_hangs),
                         ("CRASHES", r.crashes), ("HANGS", r.hangs),
                         ("LOAD BUGS (non-Tongyi exceptions)", r.load_bugs)):
        if items:
            print(f"{title} ({len(items)}; files kept in {KEEP_DIR}):")
            for item in items[:20]:
                print("  " + item)


# --- the configs section -------------------------------------------------------------------------
# models.toml documents are generated as dicts (hypothesis), written with a small TOML emitter
# (tomli_w is not a dependency) and loaded with ``config.load_config``.

HOSTILE_TEXT = ("../../x.gguf", "/etc/passwd", "a\\b.gguf", "a\0b", "", " ", "..", ".", "a/../b",
                "~/x.gguf", "C:\\x.gguf", "line\nbreak", "\x1b[31mred", "x" * 3000, "ü/ß.gguf",
                "a//b", "./a", "owner/repo/extra", "-rf", "${HOME}/x")
HOSTILE_NAMES = ("../x", "/abs", "a/b", "a\\b", "a\0b", "..", ".", "", " x", "ü", "x" * 300,
                 "x..y", ".hidden", "a b")
GOOD_NAMES = ("mine", "m2", "Qwen2.5-7B", "a_b", "x+y")


def _toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif not c.isprintable():  # controls, bidi overrides, ... (TOML takes \u escapes)
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    """One value as TOML (tables inline): the generated documents' shapes only."""
    import datetime

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def toml_document(doc: dict[str, Any]) -> str:
    """Top-level keys with inline tables: every generated dict is expressible this way."""
    return "".join(f"{_toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


def config_documents() -> Any:
    """A hypothesis strategy of models.toml documents: mostly well-formed entries with, per key,
    a chance of a hostile value (wrong type, huge number, unicode, odd path), unknown keys and
    names, and sections of the wrong shape."""
    from hypothesis import strategies as st

    from tongyi_local.config import (
        BACKENDS,
        KV_CACHE_TYPES,
        QUANTIZATIONS,
        ROLES,
        SOURCES,
    )

    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
    ints = st.integers(-(2**63), 2**63 - 1) | st.sampled_from((0, -1, 1, 16, 2**31, 2**40))
    leaves = (st.booleans() | ints | st.floats() | text | st.sampled_from(HOSTILE_TEXT)
              | st.dates())
    anything = st.recursive(leaves, lambda c: st.lists(c, max_size=3)
                            | st.dictionaries(text, c, max_size=3), max_leaves=6)

    # 1 in 10 hostile. Not on 0: hypothesis often draws all-zero ("simplest") choices, which
    # would make most documents hostile everywhere and most rejections the same one.
    def mostly(good: Any, hostile: Any = anything) -> Any:
        return st.integers(0, 9).flatmap(lambda i: hostile if i == 7 else good)

    name = mostly(st.sampled_from(GOOD_NAMES), st.sampled_from(HOSTILE_NAMES) | text)
    sampling = st.fixed_dictionaries({}, optional={
        "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0.01, 1)),
        "max_tokens": mostly(st.integers(1, 4096)), "stop": mostly(st.lists(text, max_size=2)),
        "seed": mostly(st.integers(0, 2**32)), "ignore_eos": mostly(st.booleans())})
    model = st.fixed_dictionaries({}, optional={
        "backend": mostly(st.sampled_from(BACKENDS)), "source": mostly(st.sampled_from(SOURCES)),
        "path": mostly(st.sampled_from(("/models/m.gguf", "rel/m.gguf", "~/m.gguf"))),
        "repo": mostly(st.sampled_from(("owner/name", "bartowski/Qwen2.5-7B-Instruct-GGUF"))),
        "file": mostly(st.sampled_from(("m-Q4_K_M.gguf", "sub/m.gguf"))),
        "revision": mostly(st.sampled_from(("main", "abc123", "v1.0"))),
        "sha256": mostly(st.just("0" * 64)), "quantization": mostly(st.sampled_from(QUANTIZATIONS)),
        "context_length": mostly(st.integers(16, 1 << 20)), "threads": mostly(
            st.just("auto") | st.integers(1, 64)), "batch_size": mostly(st.integers(16, 4096)),
        "mmap": mostly(st.booleans()), "kv_cache_type": mostly(st.sampled_from(KV_CACHE_TYPES)),
        "sampling": mostly(sampling), "model_id": mostly(st.just("qwen-plus")),
        "base_url": mostly(st.just("http://localhost:8000/v1")),
        "api_key_env": mostly(st.just("KEY")), "timeout_s": mostly(st.floats(0.1, 600)),
        "replies": mostly(st.lists(text, max_size=2)), "remote": mostly(st.booleans())})
    kinds = st.sampled_from((
        {"source": "path", "path": "/models/m.gguf"}, {"source": "starter"},
        {"source": "hub", "repo": "owner/name", "file": "m-Q4_K_M.gguf"},
        {"source": "starter-chat"}, {"backend": "dashscope", "model_id": "qwen-plus"},
        {"backend": "openai", "model_id": "q", "base_url": "http://localhost:8000/v1"},
        {"backend": "fake", "replies": ["hi"]}))
    model = st.tuples(kinds, model).map(lambda t: {**t[0], **t[1]})  # a coherent kind, overlaid
    unknown = st.dictionaries(st.sampled_from(("colour", "Path", "threads2")) | text, anything,
                              max_size=1)
    entry = st.tuples(model, st.integers(0, 9), unknown).map(
        lambda t: {**t[0], **t[2]} if t[1] == 7 else t[0])

    @st.composite
    def documents(draw: Any) -> dict[str, Any]:
        models = draw(st.dictionaries(name, entry, max_size=3))
        refs = st.sampled_from([*models, "starter", "starter-chat"]) | name
        role_names = mostly(st.sampled_from(ROLES), name)
        role = st.fixed_dictionaries({"model": mostly(refs)}, optional={
            "system_prompt": mostly(text), "sampling": mostly(sampling),
            "fallback": mostly(refs), "privacy": mostly(st.sampled_from(("any", "local-only")))})
        doc: dict[str, Any] = {
            "models": models, "roles": draw(st.dictionaries(role_names, role, max_size=3)),
            "profiles": draw(st.dictionaries(name, st.dictionaries(role_names, mostly(refs),
                                                                   max_size=3), max_size=2))}
        if draw(st.integers(0, 19)) == 7:  # a section of the wrong shape, or an unknown one
            doc[draw(st.sampled_from(("models", "roles", "profiles", "extra")))] = draw(anything)
        return doc

    return documents()


def render_key(*parts: str) -> str:
    """A dotted key as the messages must show it: bare when it can be, else a TOML basic
    string with every unprintable character escaped."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else _toml_string(p) for p in parts)


def _key_paths(doc: dict[str, Any]) -> set[str]:
    """Every key path of depth 2 and more in the document, rendered as messages show them;
    depth 1 for a top-level key that is unknown or not a table (those errors can name no more)."""
    paths: set[str] = set()

    def walk(prefix: tuple[str, ...], value: Any) -> None:
        if len(prefix) >= 2:
            paths.add(render_key(*prefix))
        if isinstance(value, dict):
            for k, v in value.items():
                walk(prefix + (k,), v)

    for k, v in doc.items():
        if k not in ("models", "roles", "profiles") or not isinstance(v, dict) or any(
                not isinstance(e, dict) for e in v.values()):
            paths.add(render_key(k))
        walk((k,), v)
    return paths


@dataclass(frozen=True)
class ConfigVerdict:
    outcome: str  # "accepted", "rejected", "bug"
    detail: str


def check_config(path: Path, doc: dict[str, Any]) -> ConfigVerdict:
    """Load ``path`` (holding ``doc``): a ConfigError naming the file and a key of the document,
    or an accepted config whose every role resolves, whose hub files stay inside the model
    directory and whose names cannot make paths; anything else is a bug."""
    from tongyi_local.config import load_config
    from tongyi_local.errors import ConfigError

    try:
        config = load_config(path)
    except ConfigError as exc:
        msg = str(exc)
        if str(path) not in msg:
            return ConfigVerdict("bug", f"ConfigError without the file: {msg}")
        if not any(p in msg for p in _key_paths(doc)):
            return ConfigVerdict("bug", f"ConfigError without a key of the document: {msg}")
        return ConfigVerdict("rejected", msg.removeprefix(f"{path}: "))
    except Exception as exc:  # noqa: BLE001 - what the fuzzing looks for
        return ConfigVerdict("bug", f"{type(exc).__name__}: {exc}")
    problem = _accepted_problem(config)
    return ConfigVerdict("bug", problem) if problem else ConfigVerdict("accepted", "")


_TEXT_FIELDS = ("path", "repo", "file", "revision", "model_id", "base_url", "api_key_env")


def _accepted_problem(config: Any) -> str:
    """Why an accepted config is unsafe or unusable ("" when it is fine)."""
    from tongyi_local.paths import models_dir
    from tongyi_local.registry import model_status
    from tongyi_local.types import Sampling

    try:
        for profile in (None, *config.profiles):
            for role in config.roles:
                spec = config.model_for(role, profile)
                Sampling().merged(spec.sampling).merged(config.role(role, profile).sampling)
        for role in config.roles.values():
            if not all(isinstance(v, (str, type(None))) for v in (role.system_prompt,
                                                                  role.fallback)):
                return f"role {role.name}: a system_prompt or fallback that is not text accepted"
        for spec in config.models.values():
            if re.search(r"[/\\\0]|\.\.", spec.name):
                return f"model name {spec.name!r} accepted"
            texts = [getattr(spec, k) for k in _TEXT_FIELDS if getattr(spec, k) is not None]
            if not all(isinstance(t, str) and t.isprintable() and t for t in texts):
                return f"model {spec.name}: a path, name or URL that is not printable text: {texts}"
            if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 32
                       for n in (spec.context_length, spec.batch_size)) or not all(
                    t == "auto" or type(t) is int and 0 < t <= 4096
                    for t in (spec.threads, spec.batch_threads)):
                return f"model {spec.name}: sizes or threads out of range accepted"
            where = os.path.normpath(model_status(spec)["where"])
            inside = where.startswith(str(models_dir()) + os.sep)
            if spec.backend == "llama" and spec.source == "hub" and not inside:
                return f"hub file {spec.repo}/{spec.file} escapes the model directory: {where}"
    except Exception as exc:  # noqa: BLE001
        return f"accepted, then {type(exc).__name__}: {exc}"
    return ""


@dataclass
class ConfigReport:
    configs: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # key path kind -> count
    bugs: list[str] = field(default_factory=list)
    cli: list[str] = field(default_factory=list)  # problems with the CLI's error output
    cli_runs: int = 0
    seconds: float = 0.0


_SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'


def reject_group(detail: str) -> str:
    """A rejection by the kind of key it names: models.*.file, roles.*.model, profiles.*.*."""
    m = re.match(rf"(?:unknown key )?({_SEGMENT}(?:\.{_SEGMENT})*)", detail)
    parts = re.findall(_SEGMENT, m.group(1)) if m else []
    if not parts:
        return detail[:60]
    if parts[0] in ("models", "roles", "profiles"):
        parts[1:2] = ["*"] * len(parts[1:2])
        if parts[0] == "profiles":
            parts[2:3] = ["*"] * len(parts[2:3])
    return ".".join(parts[:3]) + (" (unknown key)" if detail.startswith("unknown key") else "")


def fuzz_configs(n: int, *, directory: Path, rng_seed: int = 0) -> ConfigReport:
    """``n`` generated documents through ``check_config`` (hypothesis drives the generation)."""
    from hypothesis import HealthCheck, given, seed, settings

    report, started = ConfigReport(), time.perf_counter()
    path = directory / "models.toml"

    @seed(rng_seed)
    @settings(max_examples=n, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(config_documents())
    def run(doc: dict[str, Any]) -> None:
        path.write_text(toml_document(doc), encoding="utf-8")
        verdict = check_config(path, doc)
        report.configs += 1
        if verdict.outcome == "accepted":
            report.accepted += 1
        elif verdict.outcome == "rejected":
            report.rejected[reject_group(verdict.detail)] += 1
        else:
            report.bugs.append(f"{verdict.detail[:300]}\n    document: {toml_document(doc)[:300]!r}")

    with _isolated_home(directory):
        run()
    report.seconds = time.perf_counter() - started
    return report


@contextmanager
def _isolated_home(directory: Path) -> Iterator[None]:
    """No user file or $TONGYI_LOCAL_CONFIG leaks into the layering while fuzzing."""
    saved = {k: os.environ.get(k) for k in ("TONGYI_LOCAL_HOME", "TONGYI_LOCAL_CONFIG",
                                            "TONGYI_LOCAL_PROFILE")}
    os.environ["TONGYI_LOCAL_HOME"] = str(directory / "home")
    os.environ.pop("TONGYI_LOCAL_CONFIG", None)
    os.environ.pop("TONGYI_LOCAL_PROFILE", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The reports of issue 10, and names that would leave the model directory.
HOSTILE_CONFIGS = {
    "integer path": '[models.x]\nsource = "path"\npath = 5\n[roles.coder]\nmodel = "x"\n',
    "integer hub file": '[models.x]\nsource = "hub"\nrepo = "a/b"\nfile = 7\n',
    "hub file ../../x.gguf": '[models.x]\nsource = "hub"\nrepo = "a/b"\nfile = "../../x.gguf"\n',
    "system_prompt = [1, 2]": '[roles.coder]\nmodel = "starter"\nsystem_prompt = [1, 2]\n',
    "NUL in path": '[models.x]\nsource = "path"\npath = "/models/a\\u0000b.gguf"\n',
    "model name ../evil": '[models."../evil"]\nsource = "path"\npath = "/m.gguf"\n',
    "absolute repo": '[models.x]\nsource = "hub"\nrepo = "/etc"\nfile = "passwd"\n',
    "huge threads": '[models.x]\nsource = "path"\npath = "/m.gguf"\nthreads = 1099511627776\n',
    "stop = 5": '[roles.coder]\nmodel = "starter"\nsampling = { stop = 5 }\n',
    "replies = 5": '[models.f]\nbackend = "fake"\nreplies = 5\n',
}


def check_cli(path: Path, home: Path) -> str:
    """Run ``models list --config path``: "" when it exits 1 with one ``error: ...`` line naming
    the file and no traceback, else what was wrong."""
    import subprocess

    env = {**os.environ, "TONGYI_LOCAL_HOME": str(home)}
    env.pop("TONGYI_LOCAL_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "tongyi_local", "models", "list", "--config",
                           str(path)], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    lines = done.stderr.strip().splitlines()
    if done.returncode != 1 or "Traceback" in done.stderr or len(lines) != 1 or not (
            lines[0].startswith("error: ") and str(path) in lines[0]):
        return f"exit {done.returncode}, stderr: {done.stderr.strip()[-400:]!r}"
    return ""


def cli_section(directory: Path, report: ConfigReport, limit: int | None = None) -> None:
    """The hostile configs through the real CLI, each in a subprocess."""
    for name, text in list(HOSTILE_CONFIGS.items())[:limit]:
        path = directory / f"cli-{len(report.cli) + report.cli_runs}.toml"
        path.write_text(text)
        report.cli_runs += 1
        problem = check_cli(path, directory / "home")
        if problem:
            report.cli.append(f"{name}: {problem}")


def print_config_report(r: ConfigReport) -> None:
    print(f"\n== configs: {r.configs} fuzzed in {r.seconds:.0f} s; accepted {r.accepted}, "
          f"rejected {sum(r.rejected.values())}, bugs {len(r.bugs)}; CLI runs {r.cli_runs}, "
          f"CLI problems {len(r.cli)}")
    print("rejected by key:")
    for key, count in r.rejected.most_common(25):
        print(f"  {count:6d}  {key}")
    for title, items in (("CONFIG BUGS", r.bugs), ("CLI PROBLEMS", r.cli)):
        if items:
            print(f"{title} ({len(items)}):")
            for item in items[:20]:
                print("  " + item)


# --- main ------------------------------------------------------------------------------------------

SHORT = {"files": 300, "configs": 200}
FULL = {"files": 10_000, "configs": 2_000}
SEED_WEIGHTS = {"tiny-qwen2": 3.0, "tiny-qwen2-f16": 2.0, "tiny-qwen3moe": 3.0, "chat": 1.5,
                "starter": 0.5}


def oracle_section(files: dict[str, Path]) -> dict[str, list[str]]:
    """``read_header`` against ``gguf.GGUFReader`` on each valid seed: their differences."""
    found = {name: reader_differences(path) for name, path in files.items()}
    print(f"\n== oracle: gguf.GGUFReader agrees with the header walker on "
          f"{sum(not d for d in found.values())} of {len(found)} seed files")
    for name, diffs in found.items():
        for diff in diffs:
            print(f"  {name}: {diff}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="CI size (%(prog)s defaults: full)")
    parser.add_argument("--files", type=int, help="mutated GGUF files to fuzz")
    parser.add_argument("--configs", type=int, help="models.toml documents to fuzz")
    parser.add_argument("--sections", default="oracle,files,configs,load,soak",
                        help="comma-separated (load and soak: benchmarks/load_soak.py)")
    parser.add_argument("--workers", type=int, default=2, help="child processes loading files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-big", action="store_true", help="tiny seeds only (no starter/chat)")
    args = parser.parse_args(argv)
    counts = {**(SHORT if args.short else FULL),
              **{k: v for k, v in (("files", args.files), ("configs", args.configs)) if v}}
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        tmp_path = Path(tmp)
        files = seed_files(tmp_path, big=not args.no_big)
        if "oracle" in sections:  # GGUFReader takes 20 s on the starter: full runs only
            oracle_section({k: v for k, v in files.items() if k != "starter" or not args.short})
        if "files" in sections:
            seeds = [read_seed(path, name) for name, path in files.items()]
            report = fuzz_files(counts["files"], seeds=seeds,
                                weights=[SEED_WEIGHTS.get(s.name, 1.0) for s in seeds],
                                workers=args.workers, rng_seed=args.seed,
                                progress=_progress(counts["files"]))
            print_file_report(report)
        if "configs" in sections:
            creport = fuzz_configs(counts["configs"], directory=tmp_path, rng_seed=args.seed)
            cli_section(tmp_path, creport, 3 if args.short else None)
            print_config_report(creport)
        if sections & {"load", "soak"}:  # requests under load, resources over a soak
            import load_soak

            load_soak.main(["--sections", ",".join(sorted(sections & {"load", "soak"}))]
                           + (["--short"] if args.short else []))


def _progress(total: int) -> Callable[[FileReport], None]:
    last = [time.perf_counter()]

    def show(r: FileReport) -> None:
        if time.perf_counter() - last[0] > 30 or r.files == total:
            last[0] = time.perf_counter()
            print(f"  ... {r.files}/{total} files, {r.accepted} accepted, loads {dict(r.loads)}",
                  file=sys.stderr, flush=True)

    return show


if __name__ == "__main__":
    main()
