"""A small real run (tiny model, real llama.cpp) -> report.md + pareto.png + figures.json."""

from __future__ import annotations

import copy
import json

import pytest

import tongyi_local
from tongyi_local.backends.quantize import quantize
from tongyi_local.evidence import results, roofline as rl, speed
from tongyi_local.evidence.quality import quality_ladder
from tongyi_local.evidence.report import _fmt, compare, write_report
from tongyi_local.evidence.tasks import TASKS, run_tasks
from tongyi_local.testing import write_tiny_model

SMALL_MIX = (("chat", 120, 8), ("rag", 400, 6), ("chat", 60, 4))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from tongyi_local.cli_evidence import _default_corpus

    d = tmp_path_factory.mktemp("run")
    f16 = write_tiny_model(d / "tiny-F16.gguf", "qwen2", n_embd=256, n_ff=512, dtype="f16")
    q4 = quantize(f16, d / "tiny-Q4_K_M.gguf", "Q4_K_M").output
    ev = results.new_evidence(stamp=speed.stamp())
    rows = [speed.run_isolated(p, mix=SMALL_MIX, rounds=1, n_ctx=512) for p in (f16, q4)]
    results.add(ev, "speed", rows)
    bw = rl.measure_bandwidth(buffer_mib=64, repeats=2)
    results.add(ev, "roofline", [rl.roofline(r.path, bw, r.decode_tps) for r in rows])
    results.add(ev, "quality", quality_ladder(f16, [q4], _default_corpus().read_text(),
                                              n_ctx=128, max_chunks=2))
    with tongyi_local.load(q4, n_ctx=512) as gen:
        results.add(ev, "tasks", run_tasks(gen, TASKS[:2], iterations=2, max_tokens=12,
                                           model=q4.stem))
    ev["cost"] = {"inputs": {"tokens_per_s": 100.0}}  # a fixed figure: tests assert no timings
    return ev, d


def test_speed_rows_are_complete_and_stamped(small_run):
    ev, _ = small_run
    for row in ev["speed"]:
        assert row["requests"] == len(SMALL_MIX)
        assert row["decode_tps"] > 0 and row["prompt_tps"] > 0 and row["ttft_ms"] > 0
        assert row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"]
        assert row["load_ms"] > 0 and row["peak_rss_mib"] > 0 and row["cpu_utilisation"] > 0
        stamp = row["stamp"]
        assert stamp["llama_cpp_commit"].startswith("0c1e570")
        assert stamp["preset"] and stamp["cpu"] and stamp["threads"] >= 1


def test_report_files_hold_every_figure(small_run, tmp_path):
    ev, _ = small_run
    files = write_report(ev, tmp_path)
    md = files.markdown.read_text()
    png = files.chart.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for r in ev["speed"]:
        for key in ("prompt_tps", "decode_tps", "ttft_ms", "latency_p50_ms", "latency_p90_ms",
                    "latency_p99_ms", "load_ms", "peak_rss_mib"):
            assert _fmt(r[key]) in md, key
    for q in ev["quality"]:
        for key in ("kld_mean", "kld_median", "kld_p99", "kld_max"):
            assert _fmt(q[key], 6) in md, key
        assert _fmt(100 * q["top1_agreement"], 2) in md and _fmt(q["ppl"], 3) in md
    for r in ev["roofline"]:
        assert _fmt(r["decode_bound_tps"]) in md and _fmt(r["percent_of_bound"]) in md
    for t in ev["tasks"]:
        assert f"| {t['model']} | {t['role']} | {t['task']} |" in md
    assert "## Recommendation per role" in md and "## Cost: local vs API" in md
    figures = json.loads(files.figures.read_text())
    for section in ("speed", "quality", "tasks", "roofline"):
        assert figures[section] == ev[section]
    assert {r["role"] for r in figures["recommendations"]} == {"researcher", "coder"}
    assert len(figures["cost"]["table"]) == 7 and figures["cost"]["break_even_tokens"] is not None
    assert files.regressions == ()


def test_compare_flags_regressions_beyond_the_threshold(small_run, tmp_path):
    ev, _ = small_run
    worse = copy.deepcopy(ev)
    worse["speed"][0]["decode_tps"] *= 0.5
    worse["speed"][1]["decode_tps"] *= 0.95  # within 10 %: not flagged
    worse["quality"][1]["kld_mean"] *= 2
    worse["tasks"][0]["success_rate"] = ev["tasks"][0]["success_rate"] - 0.5
    found = {(g.section, g.metric, g.key) for g in compare(ev, worse, threshold=0.10)}
    assert ("speed", "decode_tps", f"{ev['speed'][0]['model']}/{ev['speed'][0]['threads']}/"
            f"{ev['speed'][0]['pinned']}") in found
    assert ("quality", "kld_mean", f"{ev['quality'][1]['model']}/{ev['quality'][1]['reference']}") in found
    assert ("tasks", "success_rate", f"{ev['tasks'][0]['model']}/{ev['tasks'][0]['role']}/"
            f"{ev['tasks'][0]['task']}") in found
    assert not any(s == "speed" and k.startswith(ev["speed"][1]["model"]) for s, _, k in found)
    files = write_report(worse, tmp_path, previous=ev)
    assert "## Regressions against the previous run" in files.markdown.read_text()
    assert len(files.regressions) == len(found)


def test_evidence_files_round_trip_and_merge(small_run, tmp_path):
    ev, _ = small_run
    path = results.save_evidence(ev, tmp_path / "a.json")
    again = results.load_evidence(path)
    merged = results.merge(again, again)
    assert len(merged["speed"]) == 2 * len(ev["speed"]) and merged["stamp"] == ev["stamp"]
    (tmp_path / "junk.json").write_text("{}")
    from tongyi_local.errors import EvidenceError

    with pytest.raises(EvidenceError, match="not a tongyi-local evidence file"):
        results.load_evidence(tmp_path / "junk.json")
    with pytest.raises(EvidenceError, match="not found"):
        results.load_evidence(tmp_path / "none.json")
