"""Load and soak on the real llama.cpp, CI-sized (the full counts: benchmarks/load_soak.py):
threads and asyncio streams on shared models, then hundreds of mixed requests on one model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load_soak  # noqa: E402 - the load engine lives beside the full-size program


@pytest.fixture
def registry(tmp_path, chat_model_path, tiny_qwen2):
    reg = load_soak.registry_for(chat_model_path, tiny_qwen2, tmp_path)
    yield reg
    reg.close()


def test_threads_and_cancelled_streams_on_shared_models(registry):
    report = load_soak.run_load(registry, threads=8, per_thread=3, max_tokens=8, streams=10,
                                n_prompts=4, timeout_s=600)
    assert not report.deadlocked and report.errors == []
    assert report.requests == report.deterministic_requests == 24
    assert report.deterministic_differing == 0
    assert report.cancelled >= 1 and report.slots_busy_after == 0 and report.usable_after


def test_soak_holds_memory_threads_and_descriptors_flat(tiny_qwen2):
    report = load_soak.run_soak(tiny_qwen2, requests=300, warmup=60)
    assert report.errors == [] and report.requests == 300
    assert set(report.kinds) == {"short", "long", "abandon", "cancel", "overflow"}
    assert report.rss_growth_mib < 20
    assert report.threads_end <= report.threads_warm and report.fds_end <= report.fds_warm
