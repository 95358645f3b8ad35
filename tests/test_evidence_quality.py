"""KL divergence, top-1 agreement and perplexity with the real llama.cpp, checked against
llama.cpp's own llama-perplexity --kl-divergence built from the same source."""

from __future__ import annotations

import math

import pytest

from tongyi_local.backends.quantize import quantize
from tongyi_local.errors import EvidenceError
from tongyi_local.evidence.quality import (KLD_ABS_TOLERANCE, KLD_REL_TOLERANCE, Reference,
                                           crosscheck, pick_reference, quality_ladder)
from tongyi_local.testing import write_tiny_model

LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")


@pytest.fixture(scope="module")
def corpus_path():
    """The packaged corpus as a file (llama.cpp's tools read a path)."""
    from importlib.resources import as_file

    from tongyi_local.evidence.quality import default_corpus

    with as_file(default_corpus()) as path:
        yield path


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """F16 -> Q8_0 -> Q6_K -> Q5_K_M -> Q4_K_M of one tiny model (k-quant-friendly sizes)."""
    d = tmp_path_factory.mktemp("ladder")
    f16 = write_tiny_model(d / "tiny-F16.gguf", "qwen2", n_embd=256, n_ff=512, dtype="f16")
    return [f16] + [quantize(f16, d / f"tiny-{q}.gguf", q).output for q in LADDER]


@pytest.fixture(scope="module")
def ladder_results(ladder, corpus_path):
    return quality_ladder(ladder[0], ladder[1:], corpus_path.read_text(), n_ctx=128, max_chunks=3)


def test_a_model_against_itself_has_zero_divergence(ladder_results):
    self_row = ladder_results[0]
    assert self_row.file_type == "F16"
    assert self_row.kld_mean == self_row.kld_p99 == self_row.kld_max == 0.0
    assert self_row.top1_agreement == 1.0
    assert self_row.ppl == pytest.approx(self_row.ppl_reference, rel=1e-6)
    assert self_row.tokens == 3 * (128 - 1 - 64)


def test_divergence_rises_monotonically_down_the_ladder(ladder_results):
    types = [r.file_type for r in ladder_results]
    assert types == ["F16", *LADDER]
    means = [r.kld_mean for r in ladder_results]
    p99s = [r.kld_p99 for r in ladder_results]
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert all(a < b for a, b in zip(p99s, p99s[1:])), p99s
    assert ladder_results[-1].top1_agreement < ladder_results[1].top1_agreement <= 1.0
    assert all(math.isfinite(r.ppl) and r.ppl > 1 for r in ladder_results)
    assert all(r.size_bytes > s.size_bytes for r, s in zip(ladder_results, ladder_results[1:]))


def test_reference_is_the_highest_precision_file(ladder):
    assert pick_reference(list(reversed(ladder))) == ladder[0]


def test_a_short_corpus_and_a_foreign_vocabulary_are_refused(ladder, starter_path, corpus_path):
    with pytest.raises(EvidenceError, match="at least n_ctx=128"):
        Reference(ladder[0], "too short", n_ctx=128)
    with Reference(ladder[0], corpus_path.read_text(), n_ctx=64, max_chunks=1) as ref:
        with pytest.raises(EvidenceError, match="not quantizations of the same model"):
            ref.compare(starter_path)


@pytest.fixture(scope="module")
def perplexity_tool():
    from tongyi_local.evidence.tools import tool_paths

    return tool_paths(tools=("llama-perplexity", "llama-imatrix"))["llama-perplexity"]


@pytest.mark.slow
def test_kld_matches_llama_perplexity_on_the_tiny_pair(ladder, corpus_path, perplexity_tool):
    check = crosscheck(ladder[0], ladder[-1], corpus_path, binary=perplexity_tool, n_ctx=128,
                       chunks=3)
    assert check.tokens >= 100  # llama-perplexity prints statistics only from 100 tokens
    assert check.within, check
    assert abs(check.ours_kld_mean - check.llama_kld_mean) <= (
        KLD_ABS_TOLERANCE + KLD_REL_TOLERANCE * check.llama_kld_mean)
    assert check.ours_ppl == pytest.approx(check.llama_ppl, rel=1e-4)


@pytest.mark.slow
def test_kld_matches_llama_perplexity_on_the_starter_model(starter_path, tmp_path, corpus_path,
                                                           perplexity_tool):
    """Real weights, 262k vocabulary: the starter's Q4_K_M as reference, Q3_K_M made from it."""
    lower = quantize(starter_path, tmp_path / "starter-Q3_K_M.gguf", "Q3_K_M",
                     allow_requantize=True).output
    check = crosscheck(starter_path, lower, corpus_path, binary=perplexity_tool, n_ctx=128,
                       chunks=2)
    assert check.llama_kld_mean > 0.01  # a real, measurable divergence
    assert check.within, check


# Recorded from llama-perplexity (commit 0c1e570): two progress rows, then the process exited
# before its logger thread printed the rest (llama.cpp issue 22142).
TRUNCATED = """kl_divergence: 0.26 seconds per pass - ETA 0.00 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1     701.9437 ±   33.9458      -0.00320 ±    0.00674       0.00131 ±    0.00002     0.008 ±  0.001 %    77.778 ±  5.280 %
   2     694.1881 ±   24.1892       0.00786 ±    0.00490       0.00143 ±    0.00002     0.009 ±  0.001 %    76.190 ±  3.810 %
"""


def test_llama_perplexity_progress_rows_are_parsed():
    from tongyi_local.evidence.tools import parse_kld_output

    got = parse_kld_output(TRUNCATED, n_ctx=128, chunks=2)
    assert got.kld_mean == 0.00143 and got.top1_agreement == pytest.approx(0.7619)
    assert got.ppl == 694.1881 and got.ppl_reference == pytest.approx(694.1881 / math.exp(0.00786))
    assert got.tokens == 2 * 63 and got.kld_p99 is None
    with pytest.raises(EvidenceError, match="no progress row for chunk 3"):
        parse_kld_output(TRUNCATED, n_ctx=128, chunks=3)
