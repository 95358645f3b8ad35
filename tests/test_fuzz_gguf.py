"""Hostile GGUF files: the header validator refuses them with a reason, or llama.cpp loads them.

Three layers: a CI-sized mutation run over real seeds (the starter model, the packaged chat model,
tiny Qwen2 and Qwen3-MoE models) whose accepted files are loaded by the real llama.cpp in child
processes (0 crashes, 0 hangs); example tests, one per mutation class, that pin each reason;
and ``gguf.GGUFReader`` as an oracle for the header walker on valid files (a hypothesis property
over tiny-model variants). The full count, and the oracle on the chat and starter models (20 s
of GGUFReader), run in ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tongyi_local.errors import ModelLoadError
from tongyi_local.gguf_header import MAX_LAYERS, describe, estimate_memory, read_header
from tongyi_local.testing import CHATML_TEMPLATE, write_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reliability as R  # the fuzzing engine lives beside the full-size program


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    return R.seed_files(tmp_path_factory.mktemp("seeds"), big=False)


@pytest.fixture(scope="session")
def tiny_seeds(tiny_files):
    return [R.read_seed(path, name) for name, path in tiny_files.items()]


@pytest.fixture(scope="session")
def big_seeds(starter_path, chat_model_path):
    return [R.read_seed(chat_model_path, "chat"), R.read_seed(starter_path, "starter")]


@pytest.fixture(scope="session")
def qwen2(tiny_seeds):
    return tiny_seeds[0]


def rejected(tmp_path, image: R.Image, name: str = "mutant.gguf") -> str:
    """Write ``image`` and return the validator's reason; it must name the file."""
    path = tmp_path / name
    image.write(path)
    with pytest.raises(ModelLoadError) as info:
        read_header(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value.reason


def field(image: R.Image, kind: str, index: int = 0) -> tuple[int, int]:
    return image.parts[kind][index]


def set_field(image: R.Image, kind: str, value: int, index: int = 0) -> R.Image:
    start, size = field(image, kind, index)
    return R._set_int(image, start, size, value)


# --- the fuzzing engine itself ----------------------------------------------------------------

def test_seeds_lay_out_byte_for_byte(tiny_files, tiny_seeds, big_seeds, tmp_path, starter_path,
                                     chat_model_path):
    """Mutants are edits of the real files: an unmutated seed writes back the original bytes
    (whole for tiny models; the header and the size for the big ones, whose data is sparse)."""
    for seed in tiny_seeds:
        path = tmp_path / f"{seed.name}.gguf"
        R.layout(seed).write(path)
        assert path.read_bytes() == tiny_files[seed.name].read_bytes()
    for seed, original in zip(big_seeds, (chat_model_path, starter_path)):
        image = R.layout(seed)
        with open(original, "rb") as fh:
            assert fh.read(len(image.head)) == bytes(image.head)
        assert image.size == original.stat().st_size


# --- the CI-sized run ---------------------------------------------------------------------------

def test_mutation_run_no_crash_no_hang_every_reject_named(tiny_seeds, big_seeds, tmp_path):
    """250 mutants (benchmarks/reliability.py runs thousands): every one accepted or refused
    with a reason naming the file, the accepted ones loaded by llama.cpp in child processes
    without a crash or a hang."""
    seeds = tiny_seeds + big_seeds
    weights = [R.SEED_WEIGHTS[s.name] for s in seeds]
    report = R.fuzz_files(250, seeds=seeds, weights=weights, workers=2, rng_seed=1,
                          directory=tmp_path)
    R.print_file_report(report)
    assert report.files == 250
    assert report.header_bugs == [] and report.header_hangs == []
    assert report.crashes == [] and report.hangs == [] and report.load_bugs == []
    assert report.header_max_s < 5
    # the run means something: both verdicts, many reasons, and real loads
    assert report.accepted > 50 and sum(report.rejected.values()) > 75
    assert len(report.rejected) >= 12
    assert report.loads["loaded"] > 10


# --- one example per mutation class -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["version", "n_tensors", "n_kv", "key_len", "key", "value_type",
                                  "str_len", "str", "array_type", "array_count", "item_len",
                                  "item", "array_items", "value", "tensor_name_len",
                                  "tensor_name", "n_dims", "dim", "ggml_type", "tensor_offset",
                                  "padding"])
def test_truncation_at_every_structure_boundary(qwen2, tmp_path, kind):
    image = R.layout(qwen2)
    for index in (0, -1):
        start, size = field(image, kind, index)
        for cut in {start, start + size // 2, start + size - 1}:
            if cut <= start and kind == "padding":
                continue  # cut at the end of the tensor list: no tensor data at all
            image.size = cut
            assert "truncated" in rejected(tmp_path, image), (kind, index, cut)


def test_truncation_in_magic_data_start_and_tensor_data(qwen2, tmp_path):
    image = R.layout(qwen2)
    image.size = 3
    assert "not a GGUF file" in rejected(tmp_path, image)
    image.size = len(image.head)  # the tensor list ends, no data follows
    assert "tensor data needs" in rejected(tmp_path, image)
    image = R.layout(qwen2)
    image.size -= 1
    assert "tensor data needs" in rejected(tmp_path, image)


@pytest.mark.parametrize("kind, value, fragment", [
    ("n_kv", 2**63, "metadata keys"),
    ("n_kv", 70_000, "any real model"),
    ("n_tensors", 2**64 - 1, "tensors"),
    ("n_tensors", 50_000, "file can hold"),
    ("key_len", 2**62, "more than our limit of 65536"),
    ("str_len", 2**40, "limit"),
    ("item_len", 2**31, "array item claims 2147483648 bytes"),
    ("array_count", 2**30 + 1, "more than llama.cpp's limit"),
    ("array_count", 2**20, "truncated"),
    ("tensor_name_len", 2**63 - 1, "limit"),
    ("dim", 2**63, "dimension >= 2**63"),
    ("dim", 2**62, "64-bit count"),
    ("dim", 2**20, "tensor data needs"),
])
def test_huge_counts_and_lengths(qwen2, tmp_path, kind, value, fragment):
    image = R.layout(qwen2)
    index = 3 if kind == "item_len" else 0  # the fourth vocabulary item: mid-array
    reason = rejected(tmp_path, set_field(image, kind, value, index))
    assert fragment in reason or "truncated" in reason, reason


def test_huge_counts_cost_no_time_or_memory_on_the_starter(big_seeds, tmp_path):
    """A 253 MB (sparse) file claiming 2**16 tensors or keys, 2**30 vocabulary items or a
    200 MB key is refused quickly, without reading or keeping much (peak RSS of a child that
    reads them all, over its baseline)."""
    starter = R.layout(big_seeds[1])
    paths = []
    for kind, value in (("n_tensors", 2**16), ("array_count", 2**30), ("n_kv", 2**16),
                        ("key_len", 200 << 20)):
        index = len(starter.parts[kind]) - 1 if kind == "array_count" else 0
        paths.append(tmp_path / f"{kind}.gguf")
        set_field(starter, kind, value, index).write(paths[-1])
        started = time.perf_counter()
        with pytest.raises(ModelLoadError):
            read_header(paths[-1])
        assert time.perf_counter() - started < 2, kind
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *map(str, paths)], text=True,
                          capture_output=True, timeout=120, check=True)
    assert int(done.stdout) < 64 << 10, done.stdout  # KiB


_PEAK_RSS = """
import resource, sys
from tongyi_local.errors import ModelLoadError
from tongyi_local.gguf_header import read_header
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        read_header(path)
    except ModelLoadError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


@pytest.mark.parametrize("value, fragment", [(13, "unknown value type 13"),
                                             (2**31, "unknown value type"),
                                             (gguf.GGUFValueType.ARRAY, "array")])
def test_wrong_value_types(qwen2, tmp_path, value, fragment):
    image = R.layout(qwen2)
    reasons = [rejected(tmp_path, set_field(image, "value_type", value, i)) for i in (0, 5)]
    assert any(fragment in r for r in reasons), reasons


def test_array_of_arrays_and_array_of_unknown_type(qwen2, tmp_path):
    image = R.layout(qwen2)
    assert "array of arrays" in rejected(tmp_path, set_field(image, "array_type", 9))
    assert "unknown value type 77" in rejected(tmp_path, set_field(image, "array_type", 77))


@pytest.mark.parametrize("vtype, value, fragment", [
    (4, 0, "power of two"), (4, 3, "power of two"), (4, 2**31 + 1, "power of two"),
    (4, 1, "below 32"), (4, 16, "below 32"),
    (10, 32, "must be a uint32"), (8, "32", "must be a uint32")])
def test_bad_alignment(qwen2, tmp_path, vtype, value, fragment):
    seed = R._with_kv(qwen2, R.encode_kv("general.alignment", vtype, value))
    assert fragment in rejected(tmp_path, R.layout(seed))


def test_other_alignments_are_followed(qwen2, tmp_path):
    for alignment in (64, 4096):
        seed = R._with_kv(qwen2, R.encode_kv("general.alignment", 4, alignment))
        path = tmp_path / f"a{alignment}.gguf"
        R.layout(seed).write(path)
        header = read_header(path)
        assert header.alignment == alignment and header.data_offset % alignment == 0


def test_duplicate_and_empty_keys(qwen2, tmp_path):
    dup = replace(qwen2, kvs=qwen2.kvs + (qwen2.kvs[3],))
    assert "appears twice" in rejected(tmp_path, R.layout(dup))
    empty = replace(qwen2, kvs=qwen2.kvs + (R.encode_kv("", 4, 1),))
    assert "key name is empty" in rejected(tmp_path, R.layout(empty))


def test_tensor_offsets_overlapping_misaligned_out_of_order_past_the_end(qwen2, tmp_path):
    image = R.layout(qwen2)
    (a, _), (b, _) = image.parts["tensor_offset"][1], image.parts["tensor_offset"][2]
    second = int.from_bytes(image.head[a:a + 8], "little")
    overlap = set_field(image, "tensor_offset", 0, 1)
    assert "expected" in rejected(tmp_path, overlap) and "overlapping" in rejected(tmp_path, overlap)
    assert "aligned to 32" in rejected(tmp_path, set_field(image, "tensor_offset", second + 1, 1))
    swapped = image.copy()
    swapped.head[a:a + 8], swapped.head[b:b + 8] = image.head[b:b + 8], image.head[a:a + 8]
    assert "in order" in rejected(tmp_path, swapped)
    last = len(image.parts["tensor_offset"]) - 1
    for past in (image.size, 2**63, 2**64 - 1):
        assert "offset" in rejected(tmp_path, set_field(image, "tensor_offset", past, last))


def test_tensor_data_past_the_end_with_a_consistent_layout(qwen2, tmp_path):
    """A shape grown with the offsets recomputed: only the file size can tell."""
    t = qwen2.tensors[-1]
    grown = replace(qwen2, tensors=qwen2.tensors[:-1] + (replace(t, dims=(t.dims[0] * 2,
                                                                          *t.dims[1:])),))
    image = R.layout(grown)
    image.size = R.layout(qwen2).size
    assert "tensor data needs" in rejected(tmp_path, image)


@pytest.mark.parametrize("ggml_type", [4, 5, 31, 36, 42, 43, 2**31, 2**32 - 1])
def test_unknown_ggml_types(qwen2, tmp_path, ggml_type):
    reason = rejected(tmp_path, set_field(R.layout(qwen2), "ggml_type", ggml_type, 2))
    assert f"unknown type {ggml_type}" in reason


@pytest.mark.parametrize("index, ggml_type, fragment", [
    (1, 1, "a vector (norm or bias) of type F16"),   # output_norm.weight
    (0, 26, "a matrix of type I32"), (0, 28, "a matrix of type F64"),
    (0, 15, "a matrix of type Q8_K")])
def test_tensor_types_llama_cpp_cannot_compute_with(qwen2, tmp_path, index, ggml_type, fragment):
    """With a consistent layout these pass gguf.cpp and crash llama.cpp's CPU graph."""
    t = qwen2.tensors[index]
    dims = (256, t.dims[1]) if ggml_type == 15 else t.dims
    seed = replace(qwen2, tensors=qwen2.tensors[:index] + (replace(t, dims=dims,
                                                                   ggml_type=ggml_type),)
                   + qwen2.tensors[index + 1:])
    assert fragment in rejected(tmp_path, R.layout(seed))


def test_repeated_vocabulary_tokens(qwen2, tmp_path):
    """llama.cpp aborts when two token ids share a text; an empty token is "[EMPTY_<i>]"."""
    tokens = next(kv for kv in qwen2.kvs if kv.key == "tokenizer.ggml.tokens")
    texts = R._array_items(tokens)
    for i, text in ((7, texts[3]), (9, b"[EMPTY_2]")):
        fresh = list(texts)
        fresh[i] = text
        if text.startswith(b"[EMPTY"):
            fresh[2] = b""
        kv = R.encode_kv("tokenizer.ggml.tokens", R.ARRAY, fresh, R.STRING)
        reason = rejected(tmp_path, R.layout(R._with_kv(qwen2, kv)))
        assert f"token {i} " in reason and "appears twice in the vocabulary" in reason


@pytest.mark.parametrize("key, value", [("attention.key_length", 8),
                                        ("attention.value_length", 32),
                                        ("rope.dimension_count", 8),
                                        ("attention.key_length", 0)])  # found by the full run
def test_head_sizes_the_graph_asserts_on(qwen2, tmp_path, key, value):
    seed = R._with_kv(qwen2, R.encode_kv(f"qwen2.{key}", 4, value))
    assert "qwen2 needs equal head sizes" in rejected(tmp_path, R.layout(seed))


@pytest.mark.parametrize("value", [7, 18])
def test_rope_dimension_count_even_and_within_the_head(tmp_path, value):
    """gemma3 (the starter's architecture) has no head-size assert, but ggml's rope does."""
    seed = R.as_architecture(R.read_seed(write_tiny_model(tmp_path / "t.gguf", "qwen2")), "gemma3")
    seed = R._with_kv(seed, R.encode_kv("gemma3.rope.dimension_count", 4, value))
    assert "rope dimension count" in rejected(tmp_path, R.layout(seed))


def test_sentencepiece_vocabulary_without_byte_tokens(qwen2, tmp_path):
    """Found by the mutation run: a GPT-2 vocabulary relabelled "llama" aborts at the first
    prompt (unordered_map::at in byte fallback); the starter's real SentencePiece vocabulary
    has every byte and passes (test_bad_models reads it)."""
    seed = R._with_kv(qwen2, R.encode_kv("tokenizer.ggml.model", R.STRING, "llama"))
    assert "needs a token for every byte" in rejected(tmp_path, R.layout(seed))


def test_wordpiece_vocabulary_with_byte_tokens(big_seeds, tmp_path):
    """Found by relabelling the starter's SentencePiece vocabulary (which types 256 tokens as
    bytes) "bert": llama.cpp's WordPiece loader aborts on byte-typed tokens."""
    seed = R._with_kv(big_seeds[1], R.encode_kv("tokenizer.ggml.model", R.STRING, "bert"))
    assert "WordPiece ('bert') vocabulary with tokens typed as bytes" in rejected(
        tmp_path, R.layout(seed))


@pytest.mark.parametrize("model", ["none", "no_vocab"])
def test_model_without_a_tokenizer(qwen2, tmp_path, model):
    """Found by the mutation run: a vocabulary-less model asserts on the first prompt."""
    seed = R._with_kv(qwen2, R.encode_kv("tokenizer.ggml.model", R.STRING, model))
    assert "has no tokenizer" in rejected(tmp_path, R.layout(seed))


def test_huge_sliding_window(big_seeds, tmp_path):
    """Found by the mutation run: llama.cpp reserves 8 bytes per window position at each step,
    so 2**31 aborted with bad_alloc under a memory limit."""
    seed = R._with_kv(big_seeds[1], R.encode_kv("gemma3.attention.sliding_window", 4, 2**31))
    assert "at most 16777216" in rejected(tmp_path, R.layout(seed))


@pytest.mark.parametrize("value", [-1e-6, float("nan"), float("-inf")])
def test_negative_or_nan_norm_epsilon(qwen2, tmp_path, value):
    """ggml's rms_norm asserts eps >= 0: found by the mutation run, at the first token."""
    seed = R._with_kv(qwen2, R.encode_kv("qwen2.attention.layer_norm_rms_epsilon", 6, value))
    assert "finite number >= 0" in rejected(tmp_path, R.layout(seed))


def test_block_size_mismatch(qwen2, tmp_path):
    t = qwen2.tensors[0]
    q8 = replace(qwen2, tensors=(replace(t, dims=(48, t.dims[1]), ggml_type=8),)
                 + qwen2.tensors[1:])  # Q8_0 blocks hold 32 elements: 48 is not whole blocks
    assert "whole number of 32-element blocks" in rejected(tmp_path, R.layout(q8))


@pytest.mark.parametrize("dims, fragment", [((1,) * 5, "5 dimensions"),
                                            ((2**32,) * 2, "more elements than a 64-bit"),
                                            ((2**63 + 5, 1), ">= 2**63")])
def test_dimensions(qwen2, tmp_path, dims, fragment):
    t = qwen2.tensors[1]
    seed = replace(qwen2, tensors=(qwen2.tensors[0], replace(t, dims=dims)) + qwen2.tensors[2:])
    assert fragment in rejected(tmp_path, R.layout(seed))
    assert "dimensions" in rejected(tmp_path, set_field(R.layout(qwen2), "n_dims", 2**32 - 1))


def test_tensor_names_too_long_or_twice(qwen2, tmp_path):
    t0, t1 = qwen2.tensors[:2]
    long = replace(qwen2, tensors=(replace(t0, name=b"x" * 64),) + qwen2.tensors[1:])
    assert "its name claims 64 bytes, more than llama.cpp's limit of 63" in rejected(
        tmp_path, R.layout(long))
    twice = replace(qwen2, tensors=(t0, replace(t1, name=t0.name)) + qwen2.tensors[2:])
    assert "tensor name 'token_embd.weight' appears twice" in rejected(tmp_path, R.layout(twice))


@pytest.mark.parametrize("key, vtype, value, fragment", [
    ("block_count", 4, 0, "1 to 512 layers"),
    ("block_count", 4, MAX_LAYERS + 1, "1 to 512 layers"),
    ("block_count", 8, "2", "must be an integer"),
    ("attention.head_count", 6, 4.0, "must be an integer"),
    ("attention.head_count_kv", 9, [2, 2, 2**40], "must be an integer"),
    ("expert_count", 4, 1025, "at most 1024"),
    ("expert_used_count", 4, 9, "must be 1 to expert_count (4)"),
    ("expert_used_count", 9, [2, 5], "must be 1 to expert_count (4)"),
    ("expert_group_count", 4, 4, "below expert_count"),
    ("rope.scaling.type", 8, "bogus", "none, linear, yarn, longrope"),
    ("nextn_predict_layers", 4, 3, "must not exceed block_count"),
])
def test_hyperparameters_llama_cpp_would_abort_on(tiny_seeds, tmp_path, key, vtype, value,
                                                  fragment):
    moe = tiny_seeds[2]
    items = value if isinstance(value, list) else None
    kv = R.encode_kv(f"qwen3moe.{key}", vtype, items or value,
                     (10 if max(items) >= 2**32 else 4) if items else None)
    reason = rejected(tmp_path, R.layout(R._with_kv(moe, kv)))
    assert f"'qwen3moe.{key}'" in reason and fragment in reason, reason


def test_inspection_reads_what_the_validator_lets_through(tiny_seeds, tmp_path):
    """describe() and the memory estimate read per-layer counts (a list) and refuse nothing
    the validator accepted; a sliding-window pattern that is text is refused up front."""
    moe = tiny_seeds[2]
    path = tmp_path / "per-layer.gguf"
    R.layout(R._with_kv(moe, R.encode_kv("qwen3moe.expert_used_count", R.ARRAY, [2, 1],
                                         4))).write(path)
    assert describe(path)["n_expert_used"] == 2 and estimate_memory(path, 64) > 0
    seed = R._with_kv(moe, R.encode_kv("qwen3moe.attention.sliding_window_pattern", R.STRING,
                                       "every 6"))
    assert "list of booleans" in rejected(tmp_path, R.layout(seed))


def test_a_dense_model_with_experts_used_is_refused(qwen2, tmp_path):
    seed = R._with_kv(qwen2, R.encode_kv("qwen2.expert_used_count", 4, 2))
    assert "no experts" in rejected(tmp_path, R.layout(seed))


def test_unreadable_file(qwen2, tmp_path):
    path = tmp_path / "locked.gguf"
    R.layout(qwen2).write(path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: nothing to test here
            pytest.skip("running as root: permissions do not stop reads")
        with pytest.raises(ModelLoadError, match="Permission denied"):
            read_header(path)
    finally:
        path.chmod(0o600)


def test_random_bit_flips_in_every_field_kind(tiny_seeds, tmp_path):
    """In-process only (no loads): each field kind of each tiny seed, flipped many times."""
    rng = random.Random(5)
    for seed in tiny_seeds:
        image = R.layout(seed)
        for kind in image.parts:
            for _ in range(4):
                start, size = rng.choice(image.parts[kind])
                if not size:
                    continue
                mutant = image.copy()
                mutant.head[start + rng.randrange(size)] ^= 1 << rng.randrange(8)
                path = tmp_path / "flip.gguf"
                mutant.write(path)
                verdict = R.check_header(path, limit_s=5)
                assert verdict.outcome in ("accepted", "rejected"), (seed.name, kind, verdict)


# --- the oracle: gguf.GGUFReader on valid files -------------------------------------------------

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(arch=st.sampled_from(("qwen2", "qwen3moe")), n_layer=st.integers(1, 3),
       n_head_kv=st.sampled_from((1, 2)), heads_per_kv=st.sampled_from((1, 2)),
       head_dim=st.sampled_from((8, 16)), n_ff=st.sampled_from((32, 96)),
       n_expert=st.integers(2, 4), dtype=st.sampled_from(("f32", "f16")),
       context_length=st.integers(16, 1 << 20), template=st.booleans(),
       name=st.text(min_size=1, max_size=8))
def test_header_walker_agrees_with_gguf_reader(tmp_path, arch, n_layer, n_head_kv, heads_per_kv,
                                               head_dim, n_ff, n_expert, dtype, context_length,
                                               template, name):
    n_head = n_head_kv * heads_per_kv
    path = write_tiny_model(tmp_path / "oracle.gguf", arch, n_layer=n_layer, n_embd=n_head * head_dim,
                            n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_expert=n_expert,
                            n_expert_used=min(2, n_expert), n_ff_exp=n_ff, dtype=dtype,
                            context_length=context_length, name=name,
                            chat_template=CHATML_TEMPLATE if template else None)
    assert R.reader_differences(path) == []


def test_oracle_sees_a_difference(qwen2, tmp_path, monkeypatch):
    """The comparison can fail: a walker that misread a value or a tensor would be caught."""
    import tongyi_local.gguf_header as gh

    path = tmp_path / "q.gguf"
    R.layout(qwen2).write(path)
    real = gh.read_header

    def misread(p):
        h = real(p)
        h.metadata["qwen2.block_count"] = 3
        return replace(h, tensors=h.tensors[:-1] + (replace(h.tensors[-1], offset=1),))

    monkeypatch.setattr(gh, "read_header", misread)
    diffs = R.reader_differences(path)
    assert any("block_count" in d for d in diffs) and any("tensors differ" in d for d in diffs)
