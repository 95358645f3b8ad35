"""Which model and quantization per role: explicit rules over measured figures.

Why rules and not a score: a weighted score hides why a choice was made. Each rule here is one
sentence a reader can check against the numbers printed beside it, and every threshold is a
field of ``Rules`` that a team can change (``Rules.from_dict`` / a TOML table) and re-run.

Defaults: take Q6_K when its top-1 agreement with the reference is >= 98 %, else stay at Q8_0;
consider Q4_K_M only when a required decode speed is not met; prefer a smaller model when its task
success rate is >= 90 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError


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
    model: str
    family: str  # the reference it was compared with (itself when unmeasured)
    file_type: str
    size_bytes: int
    n_params: int
    decode_tps: float | None
    top1_agreement: float | None
    kld_mean: float | None
    success_rate: float | None


@dataclass(frozen=True)
class Recommendation:
    role: str
    model: str
    file_type: str
    reasons: tuple[str, ...]
    figures: dict[str, Any]

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _tps(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} t/s"


def candidates(evidence: dict[str, Any], role: str) -> list[Candidate]:
    """Join speed, quality and task rows by model name into one record per file."""
    speed: dict[str, dict] = {}
    for r in evidence.get("speed", []):
        best = speed.get(r["model"])
        if best is None or r["decode_tps"] > best["decode_tps"]:
            speed[r["model"]] = r
    quality = {q["model"]: q for q in evidence.get("quality", [])}
    tasks: dict[str, list[float]] = {}
    for t in evidence.get("tasks", []):
        if t["role"] == role:
            tasks.setdefault(t["model"], []).append(t["success_rate"])
    names = list(tasks) or list(dict.fromkeys(list(speed) + list(quality)))
    out = []
    for name in names:
        s, q = speed.get(name, {}), quality.get(name, {})
        family = q.get("reference", name).removesuffix(".gguf")
        out.append(Candidate(
            model=name, family=family, file_type=s.get("file_type") or q.get("file_type", "?"),
            size_bytes=s.get("size_bytes") or q.get("size_bytes", 0), n_params=s.get("n_params", 0),
            decode_tps=s.get("decode_tps"), top1_agreement=q.get("top1_agreement"),
            kld_mean=q.get("kld_mean"),
            success_rate=sum(tasks[name]) / len(tasks[name]) if name in tasks else None))
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


def recommend(evidence: dict[str, Any], roles: list[str] | None = None,
              rules: Rules | None = None) -> list[Recommendation]:
    """One recommendation per role, each with the figures and reasons it rests on."""
    rules = rules or Rules()
    if roles is None:
        roles = sorted({t["role"] for t in evidence.get("tasks", [])}) or ["default"]
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
        figures = {k: v for k, v in asdict(chosen).items() if k != "family"}
        out.append(Recommendation(role=role, model=chosen.model, file_type=chosen.file_type,
                                  reasons=tuple(quant_reasons + reasons), figures=figures))
    return out
