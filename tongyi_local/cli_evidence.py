"""`tongyi-local bench | quantize | report | cost`: the evidence commands.

Thin, as every command: parse, call ``tongyi_local.evidence`` (``run_suite`` for bench) /
``backends.quantize``, print.
Library errors are ``TongyiError``s and reach cli.main's one handler. ``register(app)`` adds the
commands to the main typer app.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ConfigError, EvidenceError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_rows(title: str, headers: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, justify="right" if h not in ("model", "configuration", "role", "task") else "left")
    for r in rows:
        table.add_row(*r)
    out.print(table, width=None if out.is_terminal else 160)  # pipes get whole columns


def bench(
    target: Annotated[str, typer.Argument(help="GGUF file, 'starter', or a role from models.toml.")],
    threads: Annotated[Optional[list[int]], typer.Option("--threads", help="Thread count (repeatable; default: the plan's).")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Thread sweep 1..cores (+logical), pinned and unpinned.")] = False,
    presets: Annotated[bool, typer.Option("--presets", help="Compare build presets with llama-bench (builds them once).")] = False,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Higher-precision GGUF to measure KLD/top-1 against.")] = None,
    corpus: Annotated[Optional[Path], typer.Option("--corpus", help="Text for KLD/perplexity (default: the packaged corpus).")] = None,
    tasks: Annotated[bool, typer.Option("--tasks/--no-tasks", help="Run the role task suite.")] = True,
    role: Annotated[Optional[list[str]], typer.Option("--role", help="Roles whose tasks to run (default: the target's role, else all).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Runs per task.")] = 3,
    similarity: Annotated[bool, typer.Option("--similarity/--no-similarity", help="Semantic similarity (needs the embeddings extra).")] = False,
    rounds: Annotated[int, typer.Option("--rounds", help="Passes over the request mix.")] = 2,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length for the speed runs.")] = 2048,
    quality_ctx: Annotated[int, typer.Option("--quality-ctx", help="Chunk length for KLD/perplexity.")] = 512,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the evidence JSON here.")] = None,
) -> None:
    """Measure one model (or a role's model): speed, roofline, optional sweep, quality, tasks."""
    from .evidence.results import save
    from .evidence.suite import PRESETS, Ladder, SuitePlan, resolve_target, run_suite

    path, target_role = resolve_target(target)
    roles = role or ([target_role] if target_role else None)
    plan = SuitePlan(models=(path,), threads=tuple(threads or [None]), rounds=rounds, n_ctx=ctx,
                     sweep=sweep, presets=PRESETS if presets else (),
                     ladders=(Ladder(reference, (path,)),) if reference else (),
                     quality_ctx=quality_ctx, quality_chunks=4, corpus=corpus,
                     task_models=(path,) if tasks else (),
                     task_roles=tuple(roles) if roles else None, iterations=iterations,
                     task_ctx=ctx, similarity=similarity)
    result = run_suite(plan, progress=lambda line: err.print(f"[dim]{line}[/dim]"))
    ev = result.evidence
    _print_rows(f"speed: {path.name}", ["threads", "pinned", "prompt t/s", "decode t/s", "TTFT ms",
                                        "p50 ms", "p90 ms", "p99 ms", "load ms", "RSS MiB", "CPU"],
                [[str(r.threads), str(r.pinned), f"{r.prompt_tps:.1f}", f"{r.decode_tps:.1f}",
                  f"{r.ttft_ms:.0f}", f"{r.latency_p50_ms:.0f}", f"{r.latency_p90_ms:.0f}",
                  f"{r.latency_p99_ms:.0f}", f"{r.load_ms:.0f}", f"{r.peak_rss_mib:.0f}",
                  f"{100 * r.cpu_utilisation:.0f}%"] for r in ev.speed])
    for roof in ev.roofline:
        out.print(f"roofline: {roof.bandwidth_gb_per_s:.1f} GB/s read, "
                  f"{roof.bytes_per_token / 2**20:.1f} MiB per token -> bound "
                  f"{roof.decode_bound_tps:.1f} t/s; measured {roof.measured_decode_tps:.1f} t/s "
                  f"= {roof.percent_of_bound:.0f}% of it")
    if ev.thread_sweep:
        _print_rows("thread sweep (× default)", ["configuration", "prompt t/s", "decode t/s", "prompt ×", "decode ×"],
                    [[p.label, f"{p.prompt_tps:.1f}", f"{p.decode_tps:.1f}", f"{p.prompt_ratio:.3f}",
                      f"{p.decode_ratio:.3f}"] for p in ev.thread_sweep])
    if ev.presets:
        _print_rows("presets (llama-bench, × default)", ["preset", "pp t/s", "tg t/s", "pp ×", "tg ×"],
                    [[p.preset, f"{p.pp_tps:.1f}", f"{p.tg_tps:.1f}", f"{p.pp_ratio:.3f}",
                      f"{p.tg_ratio:.3f}"] for p in ev.presets])
    for r in ev.quality[1:]:  # the first row is the reference against itself
        out.print(f"quality vs {r.reference}: KLD mean {r.kld_mean:.6f} p99 {r.kld_p99:.6f}, "
                  f"top-1 {100 * r.top1_agreement:.2f}%, PPL {r.ppl:.3f} (reference "
                  f"{r.ppl_reference:.3f}) over {r.tokens} tokens")
    if ev.tasks:
        _print_rows("tasks", ["role", "task", "success", "keywords", "chars", "similarity"],
                    [[t.role, t.task, f"{100 * t.success_rate:.0f}%", f"{100 * t.keyword_coverage:.0f}%",
                      f"{t.mean_chars:.0f}", "n/a" if t.similarity is None else f"{t.similarity:.2f}"]
                     for t in ev.tasks])
    if json_out:
        save(result, json_out)
        out.print(f"evidence written to {json_out}")


def quantize(
    source: Annotated[Path, typer.Argument(help="GGUF to quantize (ideally F16/BF16).")],
    output: Annotated[Path, typer.Argument(help="Where to write the quantized GGUF.")],
    qtype: Annotated[str, typer.Option("--type", help="Q8_0, Q6_K, Q5_K_M, Q4_K_M, ... (see QUANT_TYPES).")],
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Accept an already quantized source (quality cannot rise).")] = False,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix (GGUF from llama-imatrix).")] = None,
    imatrix_corpus: Annotated[Optional[Path], typer.Option("--imatrix-corpus", help="Compute an importance matrix from this text first (builds llama-imatrix).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads")] = None,
) -> None:
    """Quantize a GGUF in-process with llama.cpp's quantizer, with a progress bar."""
    from .backends.quantize import quantize as run_quantize
    from .evidence.tools import make_imatrix, tool_paths
    from .hardware import this_machine_plan

    if imatrix_corpus:
        imatrix = output.with_name(output.stem + ".imatrix.gguf")
        binary = tool_paths(tools=("llama-imatrix",))["llama-imatrix"]
        err.print(f"computing importance matrix with llama-imatrix -> {imatrix}")
        make_imatrix(binary, source, imatrix_corpus, imatrix,
                     threads=threads or this_machine_plan().threads)
    with Progress(TextColumn(f"quantizing to {qtype.upper()}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("q", total=None)
        result = run_quantize(source, output, qtype, threads=threads,
                              allow_requantize=allow_requantize, imatrix=imatrix,
                              on_progress=lambda done, total: progress.update(
                                  task, completed=min(done, total), total=total))
    if result.warning:
        err.print(f"[yellow]warning: {result.warning}[/yellow]")
    out.print(f"{result.output}: {result.type} from {result.source_type}, "
              f"{result.source_bytes / 2**20:.1f} MiB -> {result.output_bytes / 2**20:.1f} MiB "
              f"in {result.seconds:.1f} s" + (f" with imatrix {result.imatrix}" if result.imatrix else ""))


def _rules(path: Path | None, require: list[str] | None):
    from .evidence.decide import Rules

    data: dict = {}
    if path:
        try:
            data = tomllib.loads(path.read_text()).get("rules", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read rules from {path}: {exc}") from exc
    for item in require or []:
        role, _, tps = item.partition("=")
        try:
            data.setdefault("required_decode_tps", {})[role] = float(tps)
        except ValueError:
            raise ConfigError(f"--require-decode takes ROLE=TOKENS_PER_S, got {item!r}")
    return Rules.from_dict(data)


def report(
    evidence: Annotated[list[Path], typer.Argument(help="Evidence JSON file(s); merged in order.")],
    outdir: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md, pareto.png, figures.json.")] = Path("evidence-report"),
    compare: Annotated[Optional[Path], typer.Option("--compare", help="Previous figures.json/evidence to flag regressions against.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Relative worsening that counts as a regression.")] = 0.10,
    rules: Annotated[Optional[Path], typer.Option("--rules", help="TOML file with a [rules] table.")] = None,
    require_decode: Annotated[Optional[list[str]], typer.Option("--require-decode", help="ROLE=T/S required decode speed (repeatable; '*' for all).")] = None,
    fail_on_regression: Annotated[bool, typer.Option("--fail-on-regression", help="Exit 1 when a regression is found.")] = False,
) -> None:
    """Write report.md + pareto.png + figures.json with a recommendation per role."""
    from .evidence.report import write_report
    from .evidence.results import load, merge
    from .evidence.suite import conclude

    result = conclude(merge(*(load(p).evidence for p in evidence)),
                      rules=_rules(rules, require_decode),
                      previous=load(compare).evidence if compare else None, threshold=threshold)
    files = write_report(result, outdir)
    out.print(f"report: {files.markdown}\nchart:  {files.chart or '(no model with both speed and quality)'}"
              f"\nfigures: {files.figures}")
    for g in files.regressions:
        err.print(f"[red]regression[/red] {g.section} {g.key} {g.metric}: {g.old:.4g} -> "
                  f"{g.new:.4g} ({100 * g.change:+.1f}%)")
    if files.regressions and fail_on_regression:
        raise typer.Exit(1)


def cost(
    tokens_per_month: Annotated[float, typer.Option("--tokens-per-month", help="Generated tokens per month.")],
    tps: Annotated[Optional[float], typer.Option("--tps", help="Local throughput, tokens/s (else from --results).")] = None,
    results_file: Annotated[Optional[Path], typer.Option("--results", help="Evidence JSON to take the measured decode t/s from.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Which model's speed row (default: the fastest).")] = None,
    api_usd_per_1k: Annotated[float, typer.Option("--api-usd-per-1k")] = 0.002,
    power_watts: Annotated[float, typer.Option("--power-watts")] = 350.0,
    usd_per_kwh: Annotated[float, typer.Option("--usd-per-kwh")] = 0.15,
    maintenance_hours: Annotated[float, typer.Option("--maintenance-hours", help="Per month.")] = 4.0,
    maintenance_rate: Annotated[float, typer.Option("--maintenance-rate", help="$ per hour.")] = 75.0,
    hardware_usd_per_month: Annotated[float, typer.Option("--hardware-usd-per-month")] = 0.0,
) -> None:
    """Local vs API cost per month, the break-even volume, and a 1M…1B table."""
    from .evidence.cost import CostInputs, break_even_tokens, cost_table, human_tokens, monthly_cost
    from .evidence.results import load

    if tps is None:
        if results_file is None:
            raise ConfigError("give --tps (tokens/s) or --results with a measured speed row")
        rows = [r for r in load(results_file).evidence.speed if model in (None, r.model)]
        if not rows:
            raise EvidenceError(f"{results_file} has no speed row{' for ' + model if model else ''}")
        best = max(rows, key=lambda r: r.decode_tps)
        tps = best.decode_tps
        out.print(f"throughput {tps:.1f} t/s measured for {best.model} ({best.threads} threads)")
    inputs = CostInputs(tokens_per_s=tps, api_usd_per_1k_tokens=api_usd_per_1k,
                        power_watts=power_watts, usd_per_kwh=usd_per_kwh,
                        maintenance_hours_per_month=maintenance_hours,
                        maintenance_usd_per_hour=maintenance_rate,
                        hardware_usd_per_month=hardware_usd_per_month)
    mine = monthly_cost(inputs, int(tokens_per_month))
    be = break_even_tokens(inputs)
    out.print(f"{human_tokens(mine.tokens_per_month)} tokens/month: API ${mine.api_usd:,.2f}, local "
              f"${mine.local_usd:,.2f} ({mine.machines} machine(s)) -> {mine.cheaper} is cheaper")
    out.print("break-even: " + (f"{human_tokens(be)} tokens/month" if be is not None else
                                "never (energy per token costs more than the API)")
              + (f" (beyond one machine's {human_tokens(inputs.capacity_tokens_per_month)}/month)"
                 if be is not None and be > inputs.capacity_tokens_per_month else ""))
    _print_rows("cost per month", ["tokens/month", "API $", "local $", "energy $", "fixed $",
                                   "machines", "cheaper"],
                [[human_tokens(r.tokens_per_month), f"{r.api_usd:,.2f}", f"{r.local_usd:,.2f}",
                  f"{r.local_energy_usd:,.2f}", f"{r.local_fixed_usd:,.2f}", str(r.machines), r.cheaper]
                 for r in cost_table(inputs)])


def register(app: typer.Typer) -> None:
    for command in (bench, quantize, report, cost):
        app.command()(command)
