"""The evidence suite in one call: ``run_suite(plan)`` measures, ``conclude`` decides.

Why one function: ``tongyi-local bench`` (one model) and ``benchmarks/evidence.py`` (whole
quantization ladders) run the same steps — speed per file and thread count, roofline, optional
thread sweep and preset comparison, quality against a reference, the llama.cpp cross-check, role
tasks, cost — so the steps live here once and both only describe a ``SuitePlan`` and print the
typed ``SuiteResult``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.resources import as_file
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, EvidenceError
from .cost import CostInputs, break_even_tokens, cost_table
from .decide import Rules, candidates, recommend
from .regressions import compare
from .results import CostPlan, CostSummary, Evidence, SuiteResult
from .speed import DEFAULT_MIX, SpeedRow

if TYPE_CHECKING:
    from .quality import CrossCheck, QualityResult

PRESETS = ("zen4", "avx2", "native")


@dataclass(frozen=True)
class Ladder:
    """Files of one model at several quantizations, scored against ``reference``."""

    reference: Path
    candidates: tuple[Path, ...]


def ladder_of(files: Sequence[str | Path]) -> Ladder:
    """The highest-precision file as the reference, the others as candidates."""
    from .quality import pick_reference

    reference = pick_reference(files)
    return Ladder(reference, tuple(Path(f) for f in files if Path(f) != reference))


@dataclass(frozen=True)
class SuitePlan:
    """What to measure. Every step but speed and roofline is optional."""

    models: tuple[Path, ...]                    # speed (and roofline) of each file
    threads: tuple[int | None, ...] = (None,)   # None: the machine's thread plan
    rounds: int = 2                             # passes over the request mix
    n_ctx: int = 2048                           # context of the speed runs and the sweep
    mix: tuple[tuple[str, int, int], ...] = DEFAULT_MIX
    roofline_only: tuple[Path, ...] = ()        # files with a computed bound but no speed run
    sweep: bool = False                         # thread sweep on the first model
    presets: tuple[str, ...] = ()               # llama-bench builds compared on the first model
    ladders: tuple[Ladder, ...] = ()            # quality: KLD / top-1 / perplexity
    quality_ctx: int = 512
    quality_chunks: int = 8
    crosscheck: bool = False                    # each ladder's lowest file vs llama-perplexity
    corpus: Path | None = None                  # None: the packaged corpus
    task_models: tuple[Path, ...] = ()          # role tasks run on these (none: no tasks)
    task_roles: tuple[str, ...] | None = None   # None: every role's tasks
    iterations: int = 3
    task_ctx: int = 2048
    task_max_tokens: int = 384
    similarity: bool = False                    # semantic similarity (the embeddings extra)
    api_usd_per_1k_tokens: float | None = None  # cost at the fastest task model's speed


Progress = Callable[[str], None]


def run_suite(plan: SuitePlan, *, rules: Rules | None = None,
              progress: Progress | bool | None = None) -> SuiteResult:
    """Run every step of ``plan`` on this machine and conclude with ``rules``.

    ``progress`` gets one line as each step starts (runs take minutes to hours); ``True`` draws
    a ``tqdm.auto`` bar over the plan's steps instead (a widget in Jupyter).
    """
    if progress is True:
        from ..display import step_bar

        with step_bar(planned_steps(plan), "evidence") as step:
            return _run(plan, rules, step)
    return _run(plan, rules, progress or (lambda _line: None))


def planned_steps(plan: SuitePlan) -> int:
    """How many progress lines ``run_suite`` will report for ``plan``."""
    checked = sum(1 for x in plan.ladders if x.candidates) if plan.crosscheck else 0
    return (len(plan.models) * len(plan.threads) + 1 + plan.sweep + bool(plan.presets)
            + len(plan.ladders) + checked + len(plan.task_models))


def _run(plan: SuitePlan, rules: Rules | None, say: Progress) -> SuiteResult:
    import tongyi_local

    from ..gguf_header import read_header
    from . import roofline as rl, speed, sweep as sw
    from .tasks import run_tasks

    if not plan.models:
        raise ConfigError("nothing to measure: the plan names no model file")
    for f in {*plan.models, *plan.roofline_only, *plan.task_models,
              *(p for ladder in plan.ladders for p in (ladder.reference, *ladder.candidates))}:
        read_header(f)  # a missing or bad file fails here, naming it, before any work
    if plan.ladders and plan.corpus and not plan.corpus.is_file():
        raise EvidenceError(f"corpus {plan.corpus} is not a file: give a plain-text file of a few "
                            "thousand words, or leave --corpus out for the packaged one")
    stamp = speed.stamp()
    rows = []
    for model in plan.models:
        for threads in plan.threads:
            say(f"speed of {model.name} ({threads or stamp.threads} threads)")
            rows.append(speed.run_isolated(model, threads=threads, n_ctx=plan.n_ctx,
                                           rounds=plan.rounds, mix=plan.mix))
    say("memory read bandwidth")
    bw = rl.measure_bandwidth()
    best: dict[str, float] = {}
    for r in rows:
        best[r.path] = max(best.get(r.path, 0.0), r.decode_tps)
    roofs = [rl.roofline(p, bw, tps) for p, tps in best.items()]
    roofs += [rl.roofline(p, bw) for p in plan.roofline_only]
    sweep_points, preset_points = (), ()
    if plan.sweep:
        say(f"thread sweep on {plan.models[0].name}")
        sweep_points = tuple(sw.thread_sweep(plan.models[0], mix=plan.mix, rounds=1,
                                             n_ctx=plan.n_ctx))
    if plan.presets:
        say(f"presets {', '.join(plan.presets)} with llama-bench on {plan.models[0].name}")
        preset_points = tuple(sw.preset_comparison(plan.models[0], presets=plan.presets))
    quality, checks = _quality(plan, say)
    sim = None
    if plan.similarity:
        from ..backends.embeddings import similarity as sim
    task_rows = []
    for model in plan.task_models:
        say(f"role tasks on {model.name}")
        with tongyi_local.load(model, n_ctx=plan.task_ctx) as gen:
            task_rows += run_tasks(gen, iterations=plan.iterations, similarity=sim,
                                   roles=plan.task_roles, model=model.stem,
                                   max_tokens=plan.task_max_tokens)
    cost = _cost_plan(plan, rows)
    evidence = Evidence(stamp=stamp, speed=tuple(rows), roofline=tuple(roofs),
                        thread_sweep=sweep_points, presets=preset_points, quality=tuple(quality),
                        crosscheck=tuple(checks), tasks=tuple(task_rows), cost=cost)
    return conclude(evidence, rules=rules)


def _quality(plan: SuitePlan, say: Progress) -> tuple[list[QualityResult], list[CrossCheck]]:
    """Each ladder against its reference, then (optionally) the llama-perplexity cross-check."""
    from .quality import crosscheck, default_corpus, quality_ladder

    quality, checks = [], []
    if not plan.ladders:
        return quality, checks
    with ExitStack() as stack:
        corpus = plan.corpus or stack.enter_context(as_file(default_corpus()))
        try:
            text = corpus.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise EvidenceError(f"cannot read the corpus {corpus}: {exc}; give a plain-text file "
                                "of a few thousand words") from exc
        for ladder in plan.ladders:
            say(f"quality of {len(ladder.candidates)} file(s) against {ladder.reference.name}")
            quality += quality_ladder(ladder.reference, ladder.candidates, text,
                                      n_ctx=plan.quality_ctx, max_chunks=plan.quality_chunks)
        if plan.crosscheck:
            from .tools import tool_paths

            binary = tool_paths(tools=("llama-perplexity",))["llama-perplexity"]
            for ladder in (x for x in plan.ladders if x.candidates):
                lowest = min(ladder.candidates, key=lambda m: m.stat().st_size)
                say(f"cross-check {lowest.name} vs {ladder.reference.name} with llama-perplexity")
                checks.append(crosscheck(ladder.reference, lowest, corpus, binary=binary,
                                         n_ctx=min(plan.quality_ctx, 256), chunks=4))
    return quality, checks


def _cost_plan(plan: SuitePlan, rows: list[SpeedRow]) -> CostPlan | None:
    """The plan's prices at the fastest task model's measured decode speed."""
    task_paths = {str(m) for m in plan.task_models}
    costed = [r for r in rows if r.path in task_paths and r.decode_tps > 0]
    if plan.api_usd_per_1k_tokens is None or not costed:
        return None
    top = max(costed, key=lambda r: r.decode_tps)
    return CostPlan(CostInputs(tokens_per_s=top.decode_tps,
                               api_usd_per_1k_tokens=plan.api_usd_per_1k_tokens), top.model)


def conclude(evidence: Evidence, *, rules: Rules | None = None, roles: list[str] | None = None,
             previous: Evidence | None = None, threshold: float = 0.10) -> SuiteResult:
    """What follows from the figures: per-model rows, the decision per role, the cost table,
    and regressions against ``previous`` (when given)."""
    rules = rules or Rules()
    cost = None
    if evidence.cost:
        inputs = evidence.cost.inputs
        cost = CostSummary(plan=evidence.cost, break_even_tokens=break_even_tokens(inputs),
                           table=tuple(cost_table(inputs)))
    return SuiteResult(
        evidence=evidence, models=tuple(candidates(evidence)),
        decision=tuple(recommend(evidence, roles, rules)), rules=rules, cost=cost,
        regressions=None if previous is None else tuple(compare(previous, evidence, threshold)))


def resolve_target(target: str) -> tuple[Path, str | None]:
    """A GGUF path, "starter", or a role name from models.toml -> (file, role or None)."""
    path = Path(target).expanduser()
    if path.suffix == ".gguf" or path.exists():
        return path, None
    if target == "starter":
        from .. import starter_model_path

        return starter_model_path(), None
    from ..config import load_config
    from ..registry import model_file

    spec = load_config().model_for(target)
    if spec.remote:
        raise ConfigError(f"role {target!r} runs on a remote backend ({spec.backend}); bench "
                          "measures local GGUF models")
    return model_file(spec), target
