"""Header inspection (describe) and the memory estimate, checked against what the real llama.cpp
counts and allocates for the same files."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import pytest

import tongyi_local
from tongyi_local.errors import ConfigError
from tongyi_local.backends._lookup import SpeculativeConfig
from tongyi_local.gguf_header import MiB, describe, estimate_memory, memory_breakdown, read_header
from tongyi_local.testing import write_tiny_model


@contextmanager
def loaded_with_log(path, n_ctx):
    """Load ``path`` through the library, capturing llama.cpp's log (tongyi_local.llama)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("tongyi_local.llama")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        # one slot, drafting: a logits row for its next token and one per draft token
        with tongyi_local.load(path, n_ctx=n_ctx, slots=1) as model:
            yield model, lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def mib(lines, pattern):
    """Sum of the MiB figures of log lines matching ``pattern``."""
    found = [float(m.group(1)) for line in lines if (m := re.search(pattern, line))]
    assert found, f"llama.cpp logged no line matching {pattern!r}"
    return sum(found)


def llama_counts(model):
    from tongyi_local.backends.runtime import L

    return L.llama_model_n_params(model._model), L.llama_model_size(model._model)


def test_describe_starter_model(starter_path, starter):
    info = describe(starter_path)
    n_params, tensor_bytes = llama_counts(starter)
    assert info["architecture"] == "gemma3" and info["file_type"] == "Q4_K_M"
    assert info["n_params"] == n_params == info["n_params_active"]  # dense: all active
    assert info["tensor_bytes"] == tensor_bytes
    assert info["size_bytes"] == starter_path.stat().st_size > tensor_bytes
    assert info["context_length"] == starter.info.n_ctx_train == 32768
    assert info["n_expert"] == 0 and info["n_expert_used"] == 0
    assert (info["n_layer"], info["n_head_kv"], info["head_dim_k"]) == (18, 1, 256)
    assert info["sliding_window"] == 512 and info["n_vocab"] == 262144
    assert info["has_chat_template"] is False  # this base model's file carries none


def test_describe_dense_qwen2(tiny_qwen2):
    info = describe(read_header(tiny_qwen2))
    assert info["architecture"] == "qwen2" and info["file_type"] == "ALL_F32"
    assert info["n_params_active"] == info["n_params"] and info["n_expert"] == 0
    assert info["has_chat_template"] and info["context_length"] == 1024
    assert info["head_dim_k"] == 64 // 4 and info["sliding_window"] is None
    with loaded_with_log(tiny_qwen2, 256) as (model, _):
        assert llama_counts(model) == (info["n_params"], info["tensor_bytes"])


def test_describe_qwen3moe_counts_active_experts(tiny_qwen3moe):
    info = describe(tiny_qwen3moe)
    n_layer, n_embd, n_expert, n_used, n_ff_exp = 2, 64, 4, 2, 64  # write_tiny_model defaults
    expert_params = n_layer * 3 * n_expert * n_ff_exp * n_embd     # gate, up, down per layer
    assert (info["n_expert"], info["n_expert_used"]) == (n_expert, n_used)
    assert info["n_params_active"] == info["n_params"] - expert_params * (n_expert - n_used) // n_expert
    with loaded_with_log(tiny_qwen3moe, 256) as (model, _):
        assert llama_counts(model) == (info["n_params"], info["tensor_bytes"])


@pytest.mark.parametrize("n_expert, n_used", [(8, 1), (8, 8)])
def test_active_params_scale_with_experts_used(tmp_path, n_expert, n_used):
    path = write_tiny_model(tmp_path / "moe.gguf", "qwen3moe", n_expert=n_expert,
                            n_expert_used=n_used)
    info = describe(path)
    experts = sum(t.n_elements for t in read_header(path).tensors if "_exps" in t.name)
    assert experts == 2 * 3 * n_expert * 64 * 64
    assert info["n_params_active"] == info["n_params"] - experts + experts * n_used // n_expert


@pytest.mark.parametrize("n_ctx", [1000, 4096])
def test_estimate_matches_llama_cpp_on_the_starter_model(starter_path, n_ctx):
    est = memory_breakdown(starter_path, n_ctx, n_outputs=1 + SpeculativeConfig().max_draft)
    with loaded_with_log(starter_path, n_ctx) as (model, log):
        kv = mib(log, r"CPU KV buffer size =\s+([\d.]+) MiB")  # full + sliding-window caches
        mapped = mib(log, r"CPU_Mapped model buffer size =\s+([\d.]+) MiB")
        assert model.info.n_ctx == est.n_ctx  # llama.cpp rounds 1000 up to 1024 too
        # a step with drafts grows the output buffer to n_outputs rows of logits (llama.cpp's
        # output_reserve; it logs that only in debug builds): 8 rows more than at load
        grown = 8 * model.info.n_vocab * 4 / MiB
        compute = (mib(log, r"compute buffer size =\s+([\d.]+) MiB")
                   + mib(log, r"output buffer size =\s+([\d.]+) MiB") + grown)
    assert est.kv_cache / MiB == pytest.approx(kv, abs=0.01)
    assert est.weights / MiB == pytest.approx(mapped, abs=0.01)
    assert compute <= est.compute / MiB <= compute * 1.15  # an allowance, on the safe side
    assert estimate_memory(starter_path, n_ctx, n_outputs=9) == est.total


def test_estimate_caps_at_the_trained_context_like_the_backend(tiny_qwen2):
    est = memory_breakdown(tiny_qwen2, 8192)
    with loaded_with_log(tiny_qwen2, 8192) as (model, log):
        assert model.info.n_ctx == est.n_ctx == 1024
        assert est.kv_cache / MiB == pytest.approx(mib(log, r"CPU KV buffer size =\s+([\d.]+) MiB"))
    # 2 layers x 1024 cells x (2 kv heads x 16) x (K + V) x 2 bytes
    assert est.kv_cache == 2 * 1024 * 2 * 16 * 2 * 2


def test_estimate_kv_types_sequences_and_sliding_window(starter_path):
    f16, q8 = (memory_breakdown(starter_path, 4096, t) for t in ("f16", "q8_0"))
    assert q8.kv_cache * 64 == f16.kv_cache * 34  # q8_0: 34 bytes per 32 values
    assert memory_breakdown(starter_path, 4096, "f32").kv_cache == 2 * f16.kv_cache
    assert memory_breakdown(starter_path, 4096, n_seq=3).kv_cache == 3 * f16.kv_cache
    # 3 of gemma3's 18 layers are global; with a window-sized cache the other 15 hold
    # 512 + n_ubatch cells instead of 4096 (llama.cpp logs 12 + 15 MiB for this).
    windowed = memory_breakdown(starter_path, 4096, swa_full=False)
    assert windowed.kv_cache == (3 * 4096 + 15 * 1024) * 2 * 256 * 2
    assert estimate_memory(starter_path, 8192) > estimate_memory(starter_path, 4096)


@pytest.mark.parametrize("kwargs", [{"kv_type": "q3_k"}, {"n_ctx": 0}, {"n_seq": 0}])
def test_estimate_rejects_bad_settings(tiny_qwen2, kwargs):
    args = {"n_ctx": 512} | kwargs
    with pytest.raises(ConfigError):
        estimate_memory(tiny_qwen2, **args)
