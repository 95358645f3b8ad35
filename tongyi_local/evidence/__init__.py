"""The evidence pipeline: measure speed and quality on this machine, then decide and cost.

    suite.py        run_suite(SuitePlan) -> SuiteResult: every step below in one call; conclude()
    speed.py        one model file's speed through the public API, one process per configuration
    sweep.py        thread sweep, pinned vs unpinned, build presets (llama-bench), as ratios
    roofline.py     memory bandwidth and bytes read per token -> the decode bound
    quality.py      KLD / top-1 agreement / perplexity against a reference, and the llama.cpp check
    corpus/         the CC0 text quality is scored over (package data)
    tasks.py        per-role task suite (keywords, length, optional semantic similarity)
    tools.py        llama.cpp's own tools built from the same source (bench, perplexity, imatrix)
    results.py      the typed evidence document (Evidence, SuiteResult), merge, load and save
    jsonio.py       dataclasses to JSON and back: the one writer and reader
    decide.py       explicit, configurable rules -> a recommendation per role
    regressions.py  figures that got worse since a previous run
    cost.py         local vs API cost, break-even volume
    report.py       report.md + Pareto PNG + figures.json; show() puts it inline in Jupyter

Why a package apart from the backends: everything here is plain Python over the public API and
``backends/quantize.py`` and ``backends/logits.py``; nothing in the library imports it, so it costs nothing at runtime.
``run_suite`` and its types are imported on first use, so ``evidence.cost`` alone stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import SuiteResult
    from .suite import Ladder, SuitePlan, conclude, run_suite

__all__ = ["Ladder", "SuitePlan", "SuiteResult", "conclude", "run_suite"]


def __getattr__(name: str) -> Any:
    if name in ("Ladder", "SuitePlan", "conclude", "run_suite"):
        from . import suite

        return getattr(suite, name)
    if name == "SuiteResult":
        from .results import SuiteResult

        return SuiteResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
