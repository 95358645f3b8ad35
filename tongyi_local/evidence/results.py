"""The evidence document: every figure of a run, typed, and its one JSON form.

Why one document: the report, the recommendation, ``--compare`` and ``cost --results`` all read
the same figures, and a run on a user's server can be sent, merged and compared without running
anything again. In memory it is dataclasses end to end; ``save`` writes ``SuiteResult.to_json()``
and ``load`` / ``from_json`` is the only reader (``jsonio``), so a bad file fails in one place,
naming the file and the field.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..display import EVIDENCE, SUITE, Rendered
from ..errors import EvidenceError
from .cost import CostInputs, CostRow
from .decide import Candidate, Recommendation, Rules
from .jsonio import parse, to_json
from .quality import CrossCheck, QualityResult
from .regressions import Regression
from .roofline import Roofline
from .speed import SpeedRow, Stamp
from .sweep import PresetPoint, SweepPoint
from .tasks import TaskResult

# 1: the flat document of earlier releases (measurements at the top level), still read.
VERSION = 2


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class CostPlan:
    """The prices a run was costed with, at the throughput of ``model``."""

    inputs: CostInputs
    model: str | None = None


@dataclass(frozen=True, repr=False)
class Evidence(Rendered):
    """What was measured: rows per section, each a dataclass of its measuring module. Shows
    its tables in Jupyter; its repr counts the rows."""

    _renderer = EVIDENCE

    created: str = field(default_factory=_now)
    stamp: Stamp | None = None
    speed: tuple[SpeedRow, ...] = ()
    roofline: tuple[Roofline, ...] = ()
    thread_sweep: tuple[SweepPoint, ...] = ()
    presets: tuple[PresetPoint, ...] = ()
    quality: tuple[QualityResult, ...] = ()
    crosscheck: tuple[CrossCheck, ...] = ()
    tasks: tuple[TaskResult, ...] = ()
    cost: CostPlan | None = None


@dataclass(frozen=True)
class CostSummary:
    plan: CostPlan
    break_even_tokens: float | None
    table: tuple[CostRow, ...]


@dataclass(frozen=True, repr=False)
class SuiteResult(Rendered):
    """The measurements and what follows from them: one row per model file, the decision per
    role under ``rules``, the cost table, and regressions against a previous run (None: none
    compared). Shows the report's tables in Jupyter; ``show()`` adds the Pareto chart."""

    _renderer = SUITE

    evidence: Evidence
    models: tuple[Candidate, ...]
    decision: tuple[Recommendation, ...]
    rules: Rules
    cost: CostSummary | None = None
    regressions: tuple[Regression, ...] | None = None
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """JSON-shaped (tuples become lists), exactly what ``save`` writes."""
        return to_json(self)

    def show(self) -> None:
        """The report inline in Jupyter: tables and the Pareto chart (``report.show``)."""
        from .report import show

        show(self)


def merge(*documents: Evidence) -> Evidence:
    """Rows are concatenated (later runs after earlier ones); stamp and cost: the last one set."""
    def last(name: str) -> Any:
        return next((getattr(d, name) for d in reversed(documents) if getattr(d, name)), None)

    rows = {name: tuple(r for d in documents for r in getattr(d, name))
            for name in ("speed", "roofline", "thread_sweep", "presets", "quality", "crosscheck",
                         "tasks")}
    return Evidence(stamp=last("stamp"), cost=last("cost"), **rows)


def from_json(data: Any, source: str = "the evidence document") -> SuiteResult:
    """The one reader of evidence files: EvidenceError names the file and the bad field."""
    if isinstance(data, dict) and data.get("version") == 1:  # flat: only the measurements
        data = {"evidence": data, "models": [], "decision": [], "rules": {}, "version": VERSION}
    if not isinstance(data, dict) or data.get("version") != VERSION or "evidence" not in data:
        raise EvidenceError(f"{source} is not a tongyi-local evidence file (version {VERSION}); "
                            "produce one with `tongyi-local bench --json` or benchmarks/evidence.py")
    return parse(SuiteResult, data, source, "write it again with `tongyi-local bench --json` or "
                 "benchmarks/evidence.py")


def load(path: str | os.PathLike[str]) -> SuiteResult:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvidenceError(f"results file not found: {path}")
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"cannot read results file {path}: {exc}") from exc
    return from_json(data, str(path))


def save(result: SuiteResult, path: str | os.PathLike[str]) -> Path:
    """Written beside the target and renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(result.to_json(), fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
