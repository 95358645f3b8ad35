"""report.md, a Pareto chart and a JSON of every figure, from one evidence document, or all of
it inline in a notebook (``show``).

Why all three: the Markdown is what people read, the chart shows the quality/speed/size trade-off
at a glance, and the JSON is what ``--compare`` (and the next run) reads, so a regression in any
figure between two runs is flagged rather than noticed by luck.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EvidenceError
from .cost import human_tokens
from .regressions import Regression
from .results import CostSummary, Evidence, SuiteResult, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.3g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def markdown(result: SuiteResult, chart: str | None) -> str:
    ev = result.evidence
    lines = ["# tongyi-local evidence report", ""]
    stamp = ev.stamp or (ev.speed[0].stamp if ev.speed else None)
    if stamp:
        lines += [f"Measured on **{stamp.cpu}** ({stamp.physical_cores} cores / "
                  f"{stamp.logical_cpus} CPUs), preset `{stamp.preset}`, llama.cpp "
                  f"`{stamp.llama_cpp_commit}`, thread plan {stamp.threads} threads, pinned "
                  f"{list(stamp.pinned_cpus) if stamp.pinned_cpus else 'no'}. Created {ev.created}.",
                  ""]
    if chart:
        lines += [f"![Pareto: quality vs decode speed]({chart})", ""]
    if result.decision:
        lines += ["## Recommendation per role", ""]
        for r in result.decision:
            f = r.chosen
            lines.append(f"- **{r.role}**: `{r.model}` ({r.file_type}) — decode "
                         f"{_fmt(f.decode_tps)} t/s, top-1 {_fmt(_pc(f.top1_agreement))}%, "
                         f"KLD {_fmt(f.kld_mean, 4)}, task success "
                         f"{_fmt(_pc(f.success_rate))}%, {_mib(f.size_bytes)} MiB")
            lines += [f"  - {reason}" for reason in r.reasons]
        lines.append("")
    if result.regressions is not None:
        lines += ["## Regressions against the previous run", ""]
        lines += (_table(["section", "row", "metric", "old", "new", "change"],
                         [[g.section, g.key, g.metric, g.old, g.new, f"{100 * g.change:+.1f}%"]
                          for g in result.regressions])
                  if result.regressions else ["None beyond the threshold.", ""])
    if ev.speed:
        lines += ["## Speed", ""] + _table(
            ["model", "type", "MiB", "threads", "pinned", "prompt t/s", "decode t/s", "TTFT ms",
             "p50 ms", "p90 ms", "p99 ms", "load ms", "peak RSS MiB", "CPU util"],
            [[r.model, r.file_type, _mib(r.size_bytes), r.threads, str(r.pinned),
              r.prompt_tps, r.decode_tps, r.ttft_ms, r.latency_p50_ms, r.latency_p90_ms,
              r.latency_p99_ms, r.load_ms, r.peak_rss_mib, f"{100 * r.cpu_utilisation:.0f}%"]
             for r in ev.speed])
    if ev.thread_sweep:
        lines += ["## Thread sweep (ratios against the default)", ""] + _table(
            ["configuration", "prompt t/s", "decode t/s", "prompt ×", "decode ×"],
            [[p.label, p.prompt_tps, p.decode_tps, f"{p.prompt_ratio:.3f}",
              f"{p.decode_ratio:.3f}"] for p in ev.thread_sweep])
    if ev.presets:
        lines += ["## Build presets (llama-bench, ratios against the installed preset)", ""] + _table(
            ["preset", "pp t/s", "tg t/s", "pp ×", "tg ×", "commit"],
            [[p.preset + (" (default)" if p.is_default else ""), p.pp_tps, p.tg_tps,
              f"{p.pp_ratio:.3f}", f"{p.tg_ratio:.3f}", p.build_commit] for p in ev.presets])
    if ev.roofline:
        lines += [f"## Roofline (measured read bandwidth {ev.roofline[0].bandwidth_gb_per_s:.1f} "
                  "GB/s)", "",
                  "Above 100 %: the weights fit in the CPU caches (tiny models), or the machine was "
                  "busy while the bandwidth was measured.", ""] + _table(
            ["model", "MiB read / token", "expert share", "decode bound t/s", "measured t/s",
             "% of bound"],
            [[r.model, _mib(r.bytes_per_token), _fmt(r.expert_fraction, 3), r.decode_bound_tps,
              r.measured_decode_tps, r.percent_of_bound] for r in ev.roofline])
    if ev.quality:
        lines += ["## Quality against the reference", ""] + _table(
            ["model", "type", "reference", "tokens", "KLD mean", "KLD median", "KLD p99",
             "KLD max", "top-1 %", "PPL", "PPL ref"],
            [[q.model, q.file_type, q.reference, q.tokens, _fmt(q.kld_mean, 6),
              _fmt(q.kld_median, 6), _fmt(q.kld_p99, 6), _fmt(q.kld_max, 6),
              _fmt(_pc(q.top1_agreement), 2), _fmt(q.ppl, 3), _fmt(q.ppl_reference, 3)]
             for q in ev.quality])
    if ev.crosscheck:
        lines += ["## Cross-check with llama-perplexity --kl-divergence", ""] + _table(
            ["pair", "KLD ours", "KLD llama.cpp", "|Δ|", "tolerance", "top-1 ours %",
             "top-1 llama.cpp %", "within"],
            [[c.pair, _fmt(c.ours_kld_mean, 6), _fmt(c.llama_kld_mean, 6),
              _fmt(abs(c.ours_kld_mean - c.llama_kld_mean), 6), _fmt(c.tolerance, 6),
              _fmt(_pc(c.ours_top1), 2), _fmt(_pc(c.llama_top1), 2), str(c.within)]
             for c in ev.crosscheck])
    if ev.tasks:
        lines += ["## Role tasks", ""] + _table(
            ["model", "role", "task", "runs", "success %", "keyword coverage %", "mean chars",
             "similarity", "most missed"],
            [[t.model, t.role, t.task, t.iterations, _fmt(_pc(t.success_rate), 0),
              _fmt(_pc(t.keyword_coverage), 0), t.mean_chars, _fmt(t.similarity, 3),
              ", ".join(sorted(t.missing, key=lambda k: -t.missing[k])[:3]) or "-"]
             for t in ev.tasks])
    if result.cost:
        lines += _cost_lines(result.cost)
    return "\n".join(lines).rstrip() + "\n"


def _pc(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _cost_lines(cost: CostSummary) -> list[str]:
    inputs, be = cost.plan.inputs, cost.break_even_tokens
    lines = ["## Cost: local vs API", "",
             f"Throughput {inputs.tokens_per_s:.1f} t/s, API ${inputs.api_usd_per_1k_tokens}/1K "
             f"tokens, {inputs.power_watts:g} W at ${inputs.usd_per_kwh}/kWh, maintenance "
             f"{inputs.maintenance_hours_per_month:g} h × ${inputs.maintenance_usd_per_hour:g}, "
             f"hardware ${inputs.hardware_usd_per_month:g}/month. Break-even: "
             f"{human_tokens(be) + ' tokens/month' if be is not None else 'never (energy per token exceeds the API price)'}.",
             ""]
    return lines + _table(["tokens/month", "API $", "local $", "energy $", "fixed $", "machines",
                           "cheaper"],
                          [[human_tokens(r.tokens_per_month), f"{r.api_usd:,.2f}",
                            f"{r.local_usd:,.2f}", f"{r.local_energy_usd:,.2f}",
                            f"{r.local_fixed_usd:,.2f}", r.machines, r.cheaper]
                           for r in cost.table])


def pareto_figure(ev: Evidence) -> Figure | None:
    """Top-1 agreement (%) vs decode t/s, marker area ∝ file size, one panel per reference
    (quantizations of one model), each with its Pareto frontier; None when no model has both
    a speed and a quality row.

    Drawn on a bare ``matplotlib.figure.Figure``, not through pyplot: no backend is chosen or
    switched, so the same figure saves to a file from the CLI and shows inline in a notebook
    without disturbing its matplotlib setup.
    """
    speed: dict[str, float] = {}
    for r in ev.speed:
        speed[r.model] = max(speed.get(r.model, 0.0), r.decode_tps)
    families: dict[str, list[tuple]] = {}
    for q in ev.quality:
        if q.model in speed:
            families.setdefault(q.reference, []).append(
                (q.model, q.file_type, speed[q.model], 100 * q.top1_agreement, q.size_bytes))
    if not families:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EvidenceError("the Pareto chart needs matplotlib: pip install "
                            "'tongyi-local[evidence]'")

    cols = min(3, len(families))
    rows = -(-len(families) // cols)
    fig = Figure(figsize=(5.5 * cols, 4.2 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (reference, points) in zip(axes.flat, families.items()):
        biggest = max(p[4] for p in points) or 1
        for name, ftype, x, y, size in points:
            ax.scatter(x, y, s=40 + 700 * size / biggest, alpha=0.55)
            ax.annotate(ftype, (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
        frontier, best = [], -1.0
        for p in sorted(points, key=lambda p: -p[2]):  # fastest first; keep each better one
            if p[3] > best:
                frontier.append(p)
                best = p[3]
        ax.plot([p[2] for p in frontier], [p[3] for p in frontier], "k--", lw=1,
                label="Pareto frontier")
        ax.set_title(f"vs {reference}", fontsize=9)
        ax.set_xlabel("decode tokens/s (best measured)")
        ax.set_ylabel("top-1 agreement with reference (%)")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        ax.legend(loc="lower left", fontsize=7)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.suptitle("Quality vs speed (marker area ∝ file size)")
    fig.tight_layout()
    return fig


def pareto_chart(ev: Evidence, path: Path) -> Path | None:
    """The Pareto figure written to ``path`` (PNG); None when there is nothing to plot."""
    fig = pareto_figure(ev)
    if fig is None:
        return None
    fig.savefig(path)
    return path


def pareto_png(ev: Evidence) -> bytes | None:
    """The Pareto figure as PNG bytes (what a notebook shows inline)."""
    fig = pareto_figure(ev)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def show(result: SuiteResult) -> None:
    """The report inline in Jupyter: the tables (the result's own display), then the Pareto
    chart as a PNG. Outside a kernel the Markdown report is printed."""
    from ..display import kernel_display

    display = kernel_display()
    if display is None:
        print(markdown(result, None))
        return
    from IPython.display import Image

    display(result)
    png = pareto_png(result.evidence)
    if png is not None:
        display(Image(data=png, format="png"))


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    chart: Path | None
    figures: Path
    regressions: tuple[Regression, ...]


def write_report(result: SuiteResult, outdir: str | Path) -> ReportFiles:
    """Write report.md, pareto.png and figures.json (the result's JSON) into ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    chart = pareto_chart(result.evidence, outdir / "pareto.png")
    md = outdir / "report.md"
    md.write_text(markdown(result, chart.name if chart else None))
    figures = save(result, outdir / "figures.json")
    return ReportFiles(markdown=md, chart=chart, figures=figures,
                       regressions=result.regressions or ())
