"""A small real run (tiny model, real llama.cpp) through run_suite -> report.md + pareto.png +
figures.json, and the evidence document's JSON form."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tongyi_local.backends.quantize import quantize
from tongyi_local.errors import EvidenceError
from tongyi_local.evidence import Ladder, SuitePlan, conclude, run_suite
from tongyi_local.evidence.cost import CostInputs, break_even_tokens
from tongyi_local.evidence.regressions import compare
from tongyi_local.evidence.report import _fmt, markdown, pareto_png, write_report
from tongyi_local.evidence.results import CostPlan, from_json, load, merge, save
from tongyi_local.evidence.suite import planned_steps
from tongyi_local.testing import write_tiny_model

SMALL_MIX = (("chat", 120, 8), ("rag", 400, 6), ("chat", 60, 4))


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    f16 = write_tiny_model(d / "tiny-F16.gguf", "qwen2", n_embd=256, n_ff=512, dtype="f16")
    q4 = quantize(f16, d / "tiny-Q4_K_M.gguf", "Q4_K_M").output
    return SuitePlan(models=(f16, q4), rounds=1, n_ctx=512, mix=SMALL_MIX,
                     ladders=(Ladder(f16, (q4,)),), quality_ctx=128, quality_chunks=2,
                     task_models=(q4,), task_roles=("researcher", "coder"), iterations=2,
                     task_max_tokens=12, api_usd_per_1k_tokens=0.002)


@pytest.fixture(scope="module")
def small_run(small_plan):
    plan = small_plan
    q4 = plan.task_models[0]
    steps: list[str] = []
    result = run_suite(plan, progress=steps.append)
    assert result.evidence.cost.model == q4.stem  # costed at the task model's measured speed
    # a fixed figure from here on: the tests assert no timings
    fixed = replace(result.evidence, cost=CostPlan(CostInputs(tokens_per_s=100.0), q4.stem))
    return conclude(fixed), steps


def test_run_suite_reports_each_step(small_run, small_plan):
    _, steps = small_run
    assert [s.split(" ")[0] for s in steps] == ["speed", "speed", "memory", "quality", "role"]
    assert planned_steps(small_plan) == len(steps)  # what progress=True sizes its bar by


def test_the_result_shows_its_report_inline(small_run, capsys):
    """In Jupyter: the report's tables as HTML (names escaped), the chart as PNG; a short repr."""
    result, _ = small_run
    ev = result.evidence
    page = result._repr_html_()
    assert page.count("<table>") == page.count("</table>") >= 4
    assert "<h2>Speed</h2>" in page and "<h2>Quality against the reference</h2>" in page
    assert result._repr_markdown_() == markdown(result, None)
    odd = replace(ev, speed=(replace(ev.speed[0], model="<script>x</script>"), *ev.speed[1:]))
    shown = replace(result, evidence=odd)._repr_html_()
    assert "<script>" not in shown and "&lt;script&gt;x&lt;/script&gt;" in shown
    assert repr(result) == (
        "SuiteResult(models: tiny-F16, tiny-Q4_K_M; rows: 2 speed, 2 roofline, 2 quality, "
        f"{len(ev.tasks)} tasks; decision: "
        + ", ".join(f"{r.role}→{r.model}" for r in result.decision) + f"; created {ev.created})")
    assert repr(ev).startswith("Evidence(2 speed, 2 roofline, 2 quality,")
    png = pareto_png(ev)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    result.show()  # outside a kernel: the Markdown report on stdout
    assert capsys.readouterr().out == markdown(result, None) + "\n"


def test_speed_rows_are_complete_and_stamped(small_run):
    result, _ = small_run
    assert len(result.evidence.speed) == 2
    for row in result.evidence.speed:
        assert row.requests == len(SMALL_MIX)
        assert row.decode_tps > 0 and row.prompt_tps > 0 and row.ttft_ms > 0
        assert row.latency_p50_ms <= row.latency_p90_ms <= row.latency_p99_ms
        assert row.load_ms > 0 and row.peak_rss_mib > 0 and row.cpu_utilisation > 0
        assert row.stamp.llama_cpp_commit.startswith("0c1e570")
        assert row.stamp.preset and row.stamp.cpu and row.stamp.threads >= 1
    assert result.evidence.stamp.llama_cpp_commit.startswith("0c1e570")


def test_result_rows_per_model_and_decision(small_run):
    result, _ = small_run
    ev = result.evidence
    rows = {m.model: m for m in result.models}
    assert set(rows) == {"tiny-F16", "tiny-Q4_K_M"}
    q4 = rows["tiny-Q4_K_M"]
    assert q4.decode_tps == max(r.decode_tps for r in ev.speed if r.model == "tiny-Q4_K_M")
    assert q4.kld_mean == ev.quality[1].kld_mean > 0 and q4.ppl == ev.quality[1].ppl
    assert q4.peak_rss_mib > 0 and q4.success_rate is not None
    # costed at its own speed (None only where energy per token outprices the API at that speed)
    assert ev.cost is not None
    assert q4.break_even_tokens == break_even_tokens(replace(ev.cost.inputs,
                                                             tokens_per_s=q4.decode_tps))
    assert {r.role for r in result.decision} == {"researcher", "coder"}
    assert len(result.cost.table) == 7 and result.cost.break_even_tokens is not None


def test_report_files_hold_every_figure(small_run, tmp_path):
    result, _ = small_run
    ev = result.evidence
    files = write_report(result, tmp_path)
    md = files.markdown.read_text()
    png = files.chart.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for r in ev.speed:
        for key in ("prompt_tps", "decode_tps", "ttft_ms", "latency_p50_ms", "latency_p90_ms",
                    "latency_p99_ms", "load_ms", "peak_rss_mib"):
            assert _fmt(getattr(r, key)) in md, key
    for q in ev.quality:
        for key in ("kld_mean", "kld_median", "kld_p99", "kld_max"):
            assert _fmt(getattr(q, key), 6) in md, key
        assert _fmt(100 * q.top1_agreement, 2) in md and _fmt(q.ppl, 3) in md
    for r in ev.roofline:
        assert _fmt(r.decode_bound_tps) in md and _fmt(r.percent_of_bound) in md
    for t in ev.tasks:
        assert f"| {t.model} | {t.role} | {t.task} |" in md
    assert "## Recommendation per role" in md and "## Cost: local vs API" in md
    assert load(files.figures) == result  # figures.json is the whole result
    assert files.regressions == ()


def test_the_result_round_trips_through_its_json_form(small_run, tmp_path):
    result, _ = small_run
    data = result.to_json()
    assert json.loads(json.dumps(data)) == data  # plain JSON, nothing left to ``default=``
    assert data["evidence"]["speed"][0]["decode_tps"] == result.evidence.speed[0].decode_tps
    assert from_json(data) == result
    assert load(save(result, tmp_path / "a.json")) == result
    assert list(tmp_path.iterdir()) == [tmp_path / "a.json"]  # no temporary file left


def test_compare_flags_regressions_beyond_the_threshold(small_run, tmp_path):
    result, _ = small_run
    ev = result.evidence
    s0, s1 = ev.speed
    t0 = ev.tasks[0]
    worse = replace(ev, speed=(replace(s0, decode_tps=s0.decode_tps * 0.5),
                               replace(s1, decode_tps=s1.decode_tps * 0.95)),  # within 10 %
                    quality=(ev.quality[0], replace(ev.quality[1], kld_mean=2 * ev.quality[1].kld_mean)),
                    tasks=(replace(t0, success_rate=t0.success_rate - 0.5), *ev.tasks[1:]))
    found = {(g.section, g.metric, g.key) for g in compare(ev, worse, threshold=0.10)}
    assert ("speed", "decode_tps", f"{s0.model}/{s0.threads}/{s0.pinned}") in found
    assert ("quality", "kld_mean", f"{ev.quality[1].model}/{ev.quality[1].reference}") in found
    assert ("tasks", "success_rate", f"{t0.model}/{t0.role}/{t0.task}") in found
    assert not any(s == "speed" and k.startswith(s1.model) for s, _, k in found)
    files = write_report(conclude(worse, previous=ev), tmp_path)
    assert "## Regressions against the previous run" in files.markdown.read_text()
    assert len(files.regressions) == len(found)


def test_evidence_files_merge_and_bad_files_are_named(small_run, tmp_path):
    result, _ = small_run
    again = load(save(result, tmp_path / "a.json")).evidence
    merged = merge(again, again)
    assert merged.speed == 2 * result.evidence.speed and merged.stamp == result.evidence.stamp
    assert merged.cost == result.evidence.cost
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(EvidenceError, match="not a tongyi-local evidence file"):
        load(tmp_path / "junk.json")
    with pytest.raises(EvidenceError, match="not found"):
        load(tmp_path / "none.json")
    (tmp_path / "cut.json").write_text(json.dumps(result.to_json())[:-40])
    with pytest.raises(EvidenceError, match="cannot read results file"):
        load(tmp_path / "cut.json")
    bad = result.to_json()
    bad["evidence"]["speed"][1]["decode_tps"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(EvidenceError, match=r"bad.json has a bad value at evidence\.speed\.1\."
                                            r"decode_tps: .*valid number"):
        load(tmp_path / "bad.json")


def test_flat_version_1_files_still_read(small_run, tmp_path):
    """Earlier releases wrote the measurements at the top level (plus keys now derived)."""
    result, _ = small_run
    flat = dict(result.to_json()["evidence"], version=1, quantized=[], recommendations=[])
    (tmp_path / "v1.json").write_text(json.dumps(flat))
    assert load(tmp_path / "v1.json").evidence == result.evidence
