"""Which model and quantization per role: explicit rules over measured figures.

Why rules and not a score: a weighted score hides why a choice was made. Each rule here is one
sentence a reader can check against the numbers printed beside it, and every threshold is a
field of ``Rules`` that a team can change (``Rules.from_dict`` / a TOML table) and re-run.

Defaults: take Q6_K when its top-1 agreement with the reference is >= 98 %, else stay at Q8_0;
consider Q4_K_M only when a required decode speed is not met; prefer a smaller model when its task
success rate is >= 90 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .cost import break_even_tokens

if TYPE_CHECKING:
    from .results import Evidence


@dataclass(frozen=True)
class Rules:
    high_quant: str = "Q8_0"
    mid_quant: str = "Q6_K"
    mid_min_top1: float = 0.98
    low_quant: str = "Q4_K_M"
    required_decode_tps: dict[str, float] = field(default_factory=dict)  # role (or "*") -> t/s
    smaller_model_min_success: float = 0.90

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rules:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown decision rule(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        return cls(**data)

    def required_for(self, role: str) -> float | None:
        return self.required_decode_tps.get(role, self.required_decode_tps.get("*"))


@dataclass(frozen=True)
class Candidate:
    """One model file's figures joined across sections: speed, memory, quality, tasks, cost."""

    model: str
    family: str  # the reference it was compared with (itself when unmeasured)
    file_type: str
    size_bytes: int
    n_params: int
    decode_tps: float | None
    peak_rss_mib: float | None
    top1_agreement: float | None
    kld_mean: float | None
    ppl: float | None
    success_rate: float | None  # over the role's tasks (all its tasks in the per-model rows)
    break_even_tokens: float | None = None  # per month, at this file's speed and the run's prices


@dataclass(frozen=True)
class Recommendation:
    role: str
    chosen: Candidate
    reasons: tuple[str, ...]

    @property
    def model(self) -> str:
        return self.chosen.model

    @property
    def file_type(self) -> str:
        return self.chosen.file_type


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _tps(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} t/s"


def candidates(evidence: Evidence, role: str | None = None) -> list[Candidate]:
    """Join speed (the fastest row), quality and task rows by model name into one record per
    file: the models with tasks of ``role`` when any ran, else every model measured."""
    speed = {}
    for r in evidence.speed:
        if r.model not in speed or r.decode_tps > speed[r.model].decode_tps:
            speed[r.model] = r
    quality = {q.model: q for q in evidence.quality}
    tasks: dict[str, list[float]] = {}
    for t in evidence.tasks:
        if role in (None, t.role):
            tasks.setdefault(t.model, []).append(t.success_rate)
    names = (list(tasks) if role is not None else []) or list(
        dict.fromkeys([*speed, *quality, *tasks]))
    prices = evidence.cost.inputs if evidence.cost else None
    out = []
    for name in names:
        s, q = speed.get(name), quality.get(name)
        out.append(Candidate(
            model=name, family=q.reference.removesuffix(".gguf") if q else name,
            file_type=s.file_type if s else q.file_type if q else "?",
            size_bytes=s.size_bytes if s else q.size_bytes if q else 0,
            n_params=s.n_params if s else 0, decode_tps=s.decode_tps if s else None,
            peak_rss_mib=s.peak_rss_mib if s else None,
            top1_agreement=q.top1_agreement if q else None, kld_mean=q.kld_mean if q else None,
            ppl=q.ppl if q else None,
            success_rate=sum(tasks[name]) / len(tasks[name]) if name in tasks else None,
            break_even_tokens=break_even_tokens(replace(prices, tokens_per_s=s.decode_tps))
            if prices and s and s.decode_tps > 0 else None))
    return out


def choose_quant(family: list[Candidate], role: str, rules: Rules) -> tuple[Candidate, list[str]]:
    """Within one model's quantizations: Q6_K if close enough, else Q8_0; Q4_K_M only for speed."""
    by_type = {c.file_type: c for c in family}
    mid, high, low = (by_type.get(rules.mid_quant), by_type.get(rules.high_quant),
                      by_type.get(rules.low_quant))
    reasons: list[str] = []
    if mid and mid.top1_agreement is not None and mid.top1_agreement >= rules.mid_min_top1:
        chosen = mid
        reasons.append(f"{rules.mid_quant} top-1 agreement {_pct(mid.top1_agreement)} >= "
                       f"{_pct(rules.mid_min_top1)}: take {rules.mid_quant}")
    elif high:
        chosen = high
        reasons.append(f"{rules.mid_quant} top-1 agreement {_pct(mid.top1_agreement if mid else None)}"
                       f" {'< ' + _pct(rules.mid_min_top1) if mid else '(not measured)'}: "
                       f"stay at {rules.high_quant}")
    else:
        chosen = min(family, key=lambda c: (c.kld_mean if c.kld_mean is not None else 0.0,
                                            -c.size_bytes))
        reasons.append(f"neither {rules.mid_quant} (>= {_pct(rules.mid_min_top1)}) nor "
                       f"{rules.high_quant} measured: take the closest to the reference, "
                       f"{chosen.file_type}")
    required = rules.required_for(role)
    if required is not None and (chosen.decode_tps or 0) < required:
        if low and (low.decode_tps or 0) > (chosen.decode_tps or 0):
            met = "meets" if (low.decode_tps or 0) >= required else "still misses"
            reasons.append(f"{chosen.file_type} decodes {_tps(chosen.decode_tps)} < required "
                           f"{required:g} t/s; {rules.low_quant} decodes {_tps(low.decode_tps)} "
                           f"({met} it; top-1 {_pct(low.top1_agreement)}): take {rules.low_quant}")
            chosen = low
        else:
            reasons.append(f"{chosen.file_type} decodes {_tps(chosen.decode_tps)} < required "
                           f"{required:g} t/s and no faster {rules.low_quant} was measured")
    elif required is not None:
        reasons.append(f"{chosen.file_type} decodes {_tps(chosen.decode_tps)} >= required "
                       f"{required:g} t/s")
    return chosen, reasons


def recommend(evidence: Evidence, roles: list[str] | None = None,
              rules: Rules | None = None) -> list[Recommendation]:
    """One recommendation per role, each with the figures and reasons it rests on."""
    rules = rules or Rules()
    if roles is None:
        roles = sorted({t.role for t in evidence.tasks}) or ["default"]
    out = []
    for role in roles:
        cands = candidates(evidence, role)
        if not cands:
            continue
        families: dict[str, list[Candidate]] = {}
        for c in cands:
            families.setdefault(c.family, []).append(c)
        picks = {f: choose_quant(members, role, rules) for f, members in families.items()}
        size = {f: max(m.n_params or m.size_bytes for m in members) for f, members in families.items()}
        largest = max(picks, key=lambda f: size[f])
        chosen_family, reasons = largest, []
        smaller_ok = sorted((f for f in picks if size[f] < size[largest]
                             and (picks[f][0].success_rate or 0) >= rules.smaller_model_min_success),
                            key=lambda f: size[f])
        if smaller_ok:
            chosen_family = smaller_ok[0]
            reasons.append(f"smaller model {picks[chosen_family][0].model} succeeds "
                           f"{_pct(picks[chosen_family][0].success_rate)} of {role} tasks >= "
                           f"{_pct(rules.smaller_model_min_success)}: prefer it over "
                           f"{picks[largest][0].model} ({_pct(picks[largest][0].success_rate)})")
        elif len(picks) > 1:
            reasons.append(f"no smaller model reaches {_pct(rules.smaller_model_min_success)} "
                           f"task success: keep the largest, {picks[largest][0].model}")
        chosen, quant_reasons = picks[chosen_family]
        out.append(Recommendation(role=role, chosen=chosen, reasons=tuple(quant_reasons + reasons)))
    return out
