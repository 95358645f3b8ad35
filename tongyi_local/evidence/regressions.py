"""Figures that got worse between two runs, matched row by row.

Why a module of its own: the report prints regressions and the evidence document stores them, so
the comparison sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Evidence

# (section, the fields that name a row, metrics with +1 if higher is better / -1 if lower is)
METRICS: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]], ...] = (
    ("speed", ("model", "threads", "pinned"),
     (("decode_tps", 1), ("prompt_tps", 1), ("ttft_ms", -1), ("latency_p50_ms", -1),
      ("latency_p90_ms", -1), ("latency_p99_ms", -1), ("load_ms", -1), ("peak_rss_mib", -1))),
    ("quality", ("model", "reference"),
     (("kld_mean", -1), ("kld_p99", -1), ("top1_agreement", 1), ("ppl", -1))),
    ("tasks", ("model", "role", "task"), (("success_rate", 1),)),
)


@dataclass(frozen=True)
class Regression:
    section: str
    key: str
    metric: str
    old: float
    new: float
    change: float  # relative change, signed so that negative is worse


def compare(old: Evidence, new: Evidence, threshold: float = 0.10) -> list[Regression]:
    """Figures that got worse by more than ``threshold`` (relative; success rates absolute)."""
    found = []
    for section, key_fields, metrics in METRICS:
        def key(row: object) -> tuple:
            return tuple(getattr(row, k) for k in key_fields)  # noqa: B023 - used at once

        before = {key(r): r for r in getattr(old, section)}
        for metric, direction in metrics:
            for row in getattr(new, section):
                prev = before.get(key(row))
                a = None if prev is None else getattr(prev, metric)
                b = getattr(row, metric)
                if a is None or b is None:
                    continue
                if metric == "success_rate":
                    change = b - a
                elif a == 0:
                    continue  # KLD 0 (the reference itself) has no relative change
                else:
                    change = (b - a) / abs(a) * direction
                if change < -threshold:
                    found.append(Regression(section, "/".join(map(str, key(row))), metric,
                                            float(a), float(b), change))
    return found
