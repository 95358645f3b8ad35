"""Local vs API cost per month, from measured throughput and stated prices.

Why explicit inputs: the answer turns on a handful of numbers (API price, power draw, electricity,
people's time, hardware) that differ per team, so every one is a field with a visible default,
and the result shows the break-even volume instead of a single verdict.

Model: the API costs ``tokens / 1000 x price``. Locally, generating takes ``tokens / throughput``
hours of machine time at ``power_watts``; each machine also costs fixed maintenance and hardware
per month; a month of one machine produces at most ``throughput x 30 days`` tokens, beyond which
more machines are needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import InvalidRequestError

HOURS_PER_MONTH = 730.0  # 365 x 24 / 12
TABLE_VOLUMES = (1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000, 300_000_000,
                 1_000_000_000)


@dataclass(frozen=True)
class CostInputs:
    tokens_per_s: float                   # measured throughput of the local setup
    api_usd_per_1k_tokens: float = 0.002
    power_watts: float = 350.0            # draw of the machine while generating
    usd_per_kwh: float = 0.15
    maintenance_hours_per_month: float = 4.0
    maintenance_usd_per_hour: float = 75.0
    hardware_usd_per_month: float = 0.0   # amortised purchase or rent, per machine

    def __post_init__(self) -> None:
        bad = [f"{k}={v!r}" for k, v in asdict(self).items()
               if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
        if bad or self.tokens_per_s <= 0:
            raise InvalidRequestError("cost inputs must be finite and >= 0 (throughput > 0): "
                                      + ", ".join(bad or [f"tokens_per_s={self.tokens_per_s!r}"]))

    @property
    def fixed_usd_per_machine(self) -> float:
        return (self.maintenance_hours_per_month * self.maintenance_usd_per_hour
                + self.hardware_usd_per_month)

    @property
    def energy_usd_per_token(self) -> float:
        return self.power_watts / 1000 * self.usd_per_kwh / (self.tokens_per_s * 3600)

    @property
    def capacity_tokens_per_month(self) -> float:
        return self.tokens_per_s * 3600 * HOURS_PER_MONTH


@dataclass(frozen=True)
class CostRow:
    tokens_per_month: int
    api_usd: float
    local_usd: float
    local_energy_usd: float
    local_fixed_usd: float
    machines: int
    cheaper: str  # "local" or "api"


def monthly_cost(inputs: CostInputs, tokens_per_month: int) -> CostRow:
    if tokens_per_month < 0:
        raise InvalidRequestError(f"tokens per month must be >= 0 (got {tokens_per_month})")
    machines = max(1, math.ceil(tokens_per_month / inputs.capacity_tokens_per_month))
    energy = tokens_per_month * inputs.energy_usd_per_token
    fixed = machines * inputs.fixed_usd_per_machine
    api = tokens_per_month / 1000 * inputs.api_usd_per_1k_tokens
    local = energy + fixed
    return CostRow(tokens_per_month=tokens_per_month, api_usd=api, local_usd=local,
                   local_energy_usd=energy, local_fixed_usd=fixed, machines=machines,
                   cheaper="local" if local < api else "api")


def break_even_tokens(inputs: CostInputs) -> float | None:
    """Monthly volume above which local is cheaper (one machine), or None if it never is.

    Solves fixed + n x energy = n x api_price; with more than one machine the fixed cost steps up,
    so a break-even beyond one machine's capacity is stated as such by the caller.
    """
    api_per_token = inputs.api_usd_per_1k_tokens / 1000
    margin = api_per_token - inputs.energy_usd_per_token
    if margin <= 0:
        return None
    return inputs.fixed_usd_per_machine / margin


def cost_table(inputs: CostInputs, volumes: tuple[int, ...] = TABLE_VOLUMES) -> list[CostRow]:
    return [monthly_cost(inputs, v) for v in volumes]


def human_tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
