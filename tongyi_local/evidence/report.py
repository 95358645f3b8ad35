"""report.md, a Pareto chart and a JSON of every figure, from one evidence document.

Why all three: the Markdown is what people read, the chart shows the quality/speed/size trade-off
at a glance, and the JSON is what ``--compare`` (and the next run) reads, so a regression in any
figure between two runs is flagged rather than noticed by luck.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import EvidenceError
from .cost import CostInputs, break_even_tokens, cost_table, human_tokens
from .decide import Rules, recommend
from .results import save_evidence

# (section, metric, +1 if higher is better / -1 if lower is better)
METRICS = (
    ("speed", "decode_tps", 1), ("speed", "prompt_tps", 1), ("speed", "ttft_ms", -1),
    ("speed", "latency_p50_ms", -1), ("speed", "latency_p90_ms", -1),
    ("speed", "latency_p99_ms", -1), ("speed", "load_ms", -1), ("speed", "peak_rss_mib", -1),
    ("quality", "kld_mean", -1), ("quality", "kld_p99", -1), ("quality", "top1_agreement", 1),
    ("quality", "ppl", -1), ("tasks", "success_rate", 1),
)
_KEYS = {"speed": ("model", "threads", "pinned"), "quality": ("model", "reference"),
         "tasks": ("model", "role", "task")}


@dataclass(frozen=True)
class Regression:
    section: str
    key: str
    metric: str
    old: float
    new: float
    change: float  # relative change, signed so that negative is worse

    def to_dict(self) -> dict:
        return asdict(self)


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float = 0.10) -> list[Regression]:
    """Figures that got worse by more than ``threshold`` (relative; success rates absolute)."""
    found = []
    for section, metric, direction in METRICS:
        before = {tuple(r.get(k) for k in _KEYS[section]): r for r in old.get(section, [])}
        for row in new.get(section, []):
            key = tuple(row.get(k) for k in _KEYS[section])
            prev = before.get(key)
            if prev is None or prev.get(metric) is None or row.get(metric) is None:
                continue
            a, b = float(prev[metric]), float(row[metric])
            if metric == "success_rate":
                change = b - a
            elif a == 0:
                continue  # KLD 0 (the reference itself) has no relative change
            else:
                change = (b - a) / abs(a) * direction
            if change < -threshold:
                found.append(Regression(section, "/".join(map(str, key)), metric, a, b, change))
    return found


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


def markdown(ev: dict[str, Any], recs: list, regressions: list[Regression] | None,
             chart: str | None) -> str:
    lines = ["# tongyi-local evidence report", ""]
    stamp = ev.get("stamp") or (ev["speed"][0]["stamp"] if ev.get("speed") else None)
    if stamp:
        lines += [f"Measured on **{stamp['cpu']}** ({stamp['physical_cores']} cores / "
                  f"{stamp['logical_cpus']} CPUs), preset `{stamp['preset']}`, llama.cpp "
                  f"`{stamp['llama_cpp_commit']}`, thread plan {stamp['threads']} threads, pinned "
                  f"{stamp['pinned_cpus'] or 'no'}. Created {ev.get('created', '?')}.", ""]
    if chart:
        lines += [f"![Pareto: quality vs decode speed]({chart})", ""]
    if recs:
        lines += ["## Recommendation per role", ""]
        for r in recs:
            f = r.figures
            lines.append(f"- **{r.role}**: `{r.model}` ({r.file_type}) — decode "
                         f"{_fmt(f.get('decode_tps'))} t/s, top-1 {_fmt(_pc(f.get('top1_agreement')))}%, "
                         f"KLD {_fmt(f.get('kld_mean'), 4)}, task success "
                         f"{_fmt(_pc(f.get('success_rate')))}%, {_mib(f.get('size_bytes') or 0)} MiB")
            lines += [f"  - {reason}" for reason in r.reasons]
        lines.append("")
    if regressions is not None:
        lines += ["## Regressions against the previous run", ""]
        lines += (_table(["section", "row", "metric", "old", "new", "change"],
                         [[g.section, g.key, g.metric, g.old, g.new, f"{100 * g.change:+.1f}%"]
                          for g in regressions]) if regressions else ["None beyond the threshold.", ""])
    if ev.get("speed"):
        lines += ["## Speed", ""] + _table(
            ["model", "type", "MiB", "threads", "pinned", "prompt t/s", "decode t/s", "TTFT ms",
             "p50 ms", "p90 ms", "p99 ms", "load ms", "peak RSS MiB", "CPU util"],
            [[r["model"], r["file_type"], _mib(r["size_bytes"]), r["threads"], str(r["pinned"]),
              r["prompt_tps"], r["decode_tps"], r["ttft_ms"], r["latency_p50_ms"],
              r["latency_p90_ms"], r["latency_p99_ms"], r["load_ms"], r["peak_rss_mib"],
              f"{100 * r['cpu_utilisation']:.0f}%"] for r in ev["speed"]])
    if ev.get("thread_sweep"):
        lines += ["## Thread sweep (ratios against the default)", ""] + _table(
            ["configuration", "prompt t/s", "decode t/s", "prompt ×", "decode ×"],
            [[p["label"], p["prompt_tps"], p["decode_tps"], f"{p['prompt_ratio']:.3f}",
              f"{p['decode_ratio']:.3f}"] for p in ev["thread_sweep"]])
    if ev.get("presets"):
        lines += ["## Build presets (llama-bench, ratios against the installed preset)", ""] + _table(
            ["preset", "pp t/s", "tg t/s", "pp ×", "tg ×", "commit"],
            [[p["preset"] + (" (default)" if p["is_default"] else ""), p["pp_tps"], p["tg_tps"],
              f"{p['pp_ratio']:.3f}", f"{p['tg_ratio']:.3f}", p["build_commit"]]
             for p in ev["presets"]])
    if ev.get("roofline"):
        bw = ev["roofline"][0]["bandwidth_gb_per_s"]
        lines += [f"## Roofline (measured read bandwidth {bw:.1f} GB/s)", "",
                  "Above 100 %: the weights fit in the CPU caches (tiny models), or the machine was "
                  "busy while the bandwidth was measured.", ""] + _table(
            ["model", "MiB read / token", "expert share", "decode bound t/s", "measured t/s",
             "% of bound"],
            [[r["model"], _mib(r["bytes_per_token"]), _fmt(r["expert_fraction"], 3),
              r["decode_bound_tps"], r["measured_decode_tps"], r["percent_of_bound"]]
             for r in ev["roofline"]])
    if ev.get("quality"):
        lines += ["## Quality against the reference", ""] + _table(
            ["model", "type", "reference", "tokens", "KLD mean", "KLD median", "KLD p99",
             "KLD max", "top-1 %", "PPL", "PPL ref"],
            [[q["model"], q["file_type"], q["reference"], q["tokens"], _fmt(q["kld_mean"], 6),
              _fmt(q["kld_median"], 6), _fmt(q["kld_p99"], 6), _fmt(q["kld_max"], 6),
              _fmt(_pc(q["top1_agreement"]), 2), _fmt(q["ppl"], 3), _fmt(q["ppl_reference"], 3)]
             for q in ev["quality"]])
    if ev.get("crosscheck"):
        lines += ["## Cross-check with llama-perplexity --kl-divergence", ""] + _table(
            ["pair", "KLD ours", "KLD llama.cpp", "|Δ|", "tolerance", "top-1 ours %",
             "top-1 llama.cpp %", "within"],
            [[c["pair"], _fmt(c["ours_kld_mean"], 6), _fmt(c["llama_kld_mean"], 6),
              _fmt(abs(c["ours_kld_mean"] - c["llama_kld_mean"]), 6), _fmt(c["tolerance"], 6),
              _fmt(_pc(c["ours_top1"]), 2), _fmt(_pc(c["llama_top1"]), 2), str(c["within"])]
             for c in ev["crosscheck"]])
    if ev.get("tasks"):
        lines += ["## Role tasks", ""] + _table(
            ["model", "role", "task", "runs", "success %", "keyword coverage %", "mean chars",
             "similarity", "most missed"],
            [[t["model"], t["role"], t["task"], t["iterations"], _fmt(_pc(t["success_rate"]), 0),
              _fmt(_pc(t["keyword_coverage"]), 0), t["mean_chars"], _fmt(t["similarity"], 3),
              ", ".join(sorted(t.get("missing", {}), key=lambda k: -t["missing"][k])[:3]) or "-"]
             for t in ev["tasks"]])
    if ev.get("cost"):
        lines += _cost_lines(ev["cost"])
    return "\n".join(lines).rstrip() + "\n"


def _pc(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _cost_lines(cost: dict[str, Any]) -> list[str]:
    inputs = CostInputs(**cost["inputs"])
    be = break_even_tokens(inputs)
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
                           for r in cost_table(inputs)])


def pareto_chart(ev: dict[str, Any], path: Path) -> Path | None:
    """Top-1 agreement (%) vs decode t/s, marker area ∝ file size, one panel per reference
    (quantizations of one model), each with its Pareto frontier."""
    speed: dict[str, float] = {}
    for r in ev.get("speed", []):
        speed[r["model"]] = max(speed.get(r["model"], 0.0), r["decode_tps"])
    families: dict[str, list[tuple]] = {}
    for q in ev.get("quality", []):
        if q["model"] in speed:
            families.setdefault(q["reference"], []).append(
                (q["model"], q["file_type"], speed[q["model"]], 100 * q["top1_agreement"],
                 q["size_bytes"]))
    if not families:
        return None
    try:
        import matplotlib
    except ImportError:
        raise EvidenceError("the Pareto chart needs matplotlib: pip install "
                            "'tongyi-local[evidence]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(families))
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), dpi=110, squeeze=False)
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
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    chart: Path | None
    figures: Path
    regressions: tuple[Regression, ...]


def write_report(ev: dict[str, Any], outdir: str | Path, *, rules: Rules | None = None,
                 roles: list[str] | None = None, previous: dict[str, Any] | None = None,
                 threshold: float = 0.10) -> ReportFiles:
    """Write report.md, pareto.png and figures.json into ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    recs = recommend(ev, roles, rules)
    regressions = compare(previous, ev, threshold) if previous is not None else None
    chart = pareto_chart(ev, outdir / "pareto.png")
    text = markdown(ev, recs, regressions, chart.name if chart else None)
    md = outdir / "report.md"
    md.write_text(text)
    figures = dict(ev, recommendations=[r.to_dict() for r in recs],
                   rules=asdict(rules or Rules()),
                   regressions=[g.to_dict() for g in regressions or []])
    if ev.get("cost"):
        figures["cost"] = dict(ev["cost"], table=[r.to_dict() for r in cost_table(
            CostInputs(**ev["cost"]["inputs"]))], break_even_tokens=break_even_tokens(
            CostInputs(**ev["cost"]["inputs"])))
    save_evidence(figures, outdir / "figures.json")
    return ReportFiles(markdown=md, chart=chart, figures=outdir / "figures.json",
                       regressions=tuple(regressions or ()))
