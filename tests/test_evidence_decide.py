"""Recommendation rules on recorded result sets (no model runs: the rules are pure functions)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tongyi_local.errors import ConfigError
from tongyi_local.evidence.decide import Rules, candidates, recommend
from tongyi_local.evidence.quality import QualityResult
from tongyi_local.evidence.results import Evidence
from tongyi_local.evidence.speed import SpeedRow, Stamp
from tongyi_local.evidence.tasks import TaskResult

STAMP = Stamp(cpu="test CPU", physical_cores=16, logical_cpus=32, preset="zen4",
              llama_cpp_commit="0c1e570", threads=16, batch_threads=16, pinned_cpus=None)


def _speed(model, ftype, tps, size, params):
    return SpeedRow(model=model, path=f"/m/{model}.gguf", file_type=ftype, size_bytes=size,
                    n_params=params, threads=16, pinned=True, requests=6, load_ms=100.0,
                    prompt_tps=10 * tps, decode_tps=tps, ttft_ms=50.0, latency_p50_ms=100.0,
                    latency_p90_ms=200.0, latency_p99_ms=300.0, peak_rss_mib=size / 2**20 + 50,
                    cpu_utilisation=0.9, stamp=STAMP)


def _quality(model, ftype, ref, top1, kld):
    return QualityResult(model=model, path=f"/m/{model}.gguf", file_type=ftype, size_bytes=0,
                         reference=ref + ".gguf", n_ctx=512, chunks=3, tokens=765, kld_mean=kld,
                         kld_median=kld, kld_p99=2 * kld, kld_max=3 * kld, top1_agreement=top1,
                         ppl=10 + kld, ppl_reference=10.0)


def _task(model, role, rate):
    return TaskResult(model=model, role=role, task="t", iterations=10, success_rate=rate,
                      keyword_coverage=rate, mean_chars=300.0, similarity=None)


def family(prefix, params, q6_top1, speeds=(10.0, 12.0, 18.0)):
    """A model's Q8_0 (reference), Q6_K and Q4_K_M with their speed and quality figures."""
    ref = f"{prefix}-Q8_0"
    return Evidence(speed=(_speed(ref, "Q8_0", speeds[0], 8 * params, params),
                           _speed(f"{prefix}-Q6_K", "Q6_K", speeds[1], 6 * params, params),
                           _speed(f"{prefix}-Q4_K_M", "Q4_K_M", speeds[2], 4 * params, params)),
                    quality=(_quality(ref, "Q8_0", ref, 1.0, 0.0),
                             _quality(f"{prefix}-Q6_K", "Q6_K", ref, q6_top1, 0.004),
                             _quality(f"{prefix}-Q4_K_M", "Q4_K_M", ref, 0.93, 0.05)))


def evidence(*families, tasks=()):
    from tongyi_local.evidence.results import merge

    return replace(merge(*families), tasks=tuple(tasks))


def test_q6_k_is_taken_when_it_agrees_at_least_98_percent():
    ev = evidence(family("big", 14, q6_top1=0.985))
    (rec,) = recommend(ev, ["coder"])
    assert (rec.model, rec.file_type) == ("big-Q6_K", "Q6_K")
    assert "98.5% >= 98.0%" in rec.reasons[0]
    assert rec.chosen.top1_agreement == 0.985 and rec.chosen.decode_tps == 12.0


def test_below_98_percent_it_stays_at_q8_0():
    (rec,) = recommend(evidence(family("big", 14, q6_top1=0.975)), ["coder"])
    assert rec.file_type == "Q8_0"
    assert "97.5% < 98.0%" in rec.reasons[0] and "stay at Q8_0" in rec.reasons[0]


def test_q4_k_m_only_when_a_required_speed_is_not_met():
    ev = evidence(family("big", 14, q6_top1=0.99))
    (plain,) = recommend(ev, ["coder"], Rules(required_decode_tps={"coder": 11.0}))
    assert plain.file_type == "Q6_K" and ">= required 11 t/s" in plain.reasons[-1]
    (fast,) = recommend(ev, ["coder"], Rules(required_decode_tps={"coder": 15.0}))
    assert fast.file_type == "Q4_K_M"
    assert "12.0 t/s < required 15 t/s" in fast.reasons[-1] and "meets it" in fast.reasons[-1]
    (star,) = recommend(ev, ["reviewer"], Rules(required_decode_tps={"*": 30.0}))
    assert star.file_type == "Q4_K_M" and "still misses" in star.reasons[-1]


def test_a_smaller_model_is_preferred_when_it_succeeds_90_percent():
    big, small = family("big", 14, 0.99), family("small", 7, 0.99, speeds=(20, 25, 35))
    tasks = [_task("big-Q6_K", "coder", 1.0), _task("small-Q6_K", "coder", 0.9),
             _task("big-Q6_K", "reviewer", 1.0), _task("small-Q6_K", "reviewer", 0.6)]
    recs = {r.role: r for r in recommend(evidence(big, small, tasks=tasks))}
    assert recs["coder"].model == "small-Q6_K"
    assert any("succeeds 90.0% of coder tasks >= 90.0%" in r for r in recs["coder"].reasons)
    assert recs["reviewer"].model == "big-Q6_K"
    assert any("no smaller model reaches 90.0%" in r for r in recs["reviewer"].reasons)
    assert recs["coder"].chosen.success_rate == 0.9


def test_rules_are_configurable_and_checked():
    ev = evidence(family("big", 14, q6_top1=0.975))
    (rec,) = recommend(ev, ["coder"], Rules.from_dict({"mid_min_top1": 0.97}))
    assert rec.file_type == "Q6_K"
    with pytest.raises(ConfigError, match="unknown decision rule.*mid_top1"):
        Rules.from_dict({"mid_top1": 0.9})


def test_without_q6_or_q8_the_closest_file_is_taken():
    ev = Evidence(speed=(_speed("m-F16", "F16", 5, 16, 1), _speed("m-Q4_K_M", "Q4_K_M", 9, 4, 1)),
                  quality=(_quality("m-F16", "F16", "m-F16", 1.0, 0.0),
                           _quality("m-Q4_K_M", "Q4_K_M", "m-F16", 0.9, 0.02)))
    (rec,) = recommend(ev)
    assert (rec.role, rec.file_type) == ("default", "F16")


def test_per_model_rows_join_speed_memory_quality_tasks_and_cost():
    from tongyi_local.evidence.cost import CostInputs, break_even_tokens
    from tongyi_local.evidence.results import CostPlan

    tasks = [_task("big-Q6_K", "coder", 1.0), _task("big-Q6_K", "reviewer", 0.5)]
    ev = replace(evidence(family("big", 14, 0.99), tasks=tasks),
                 cost=CostPlan(CostInputs(tokens_per_s=1.0, api_usd_per_1k_tokens=0.01)))
    rows = {c.model: c for c in candidates(ev)}
    assert set(rows) == {"big-Q8_0", "big-Q6_K", "big-Q4_K_M"}
    q6 = rows["big-Q6_K"]
    assert (q6.family, q6.file_type, q6.decode_tps, q6.top1_agreement, q6.ppl) == (
        "big-Q8_0", "Q6_K", 12.0, 0.99, 10.004)
    assert q6.peak_rss_mib == 6 * 14 / 2**20 + 50 and q6.success_rate == 0.75  # all its tasks
    assert rows["big-Q8_0"].success_rate is None
    # each file is costed at its own speed with the run's prices
    assert q6.break_even_tokens == break_even_tokens(CostInputs(tokens_per_s=12.0,
                                                                api_usd_per_1k_tokens=0.01))
    assert rows["big-Q4_K_M"].break_even_tokens < q6.break_even_tokens
    assert all(c.break_even_tokens is None for c in candidates(replace(ev, cost=None)))
