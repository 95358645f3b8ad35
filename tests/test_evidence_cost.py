"""Local vs API cost arithmetic."""

from __future__ import annotations

import pytest

from tongyi_local.errors import InvalidRequestError
from tongyi_local.evidence.cost import (HOURS_PER_MONTH, CostInputs, break_even_tokens, cost_table,
                                        human_tokens, monthly_cost)

INPUTS = CostInputs(tokens_per_s=100.0, api_usd_per_1k_tokens=0.002, power_watts=360.0,
                    usd_per_kwh=0.25, maintenance_hours_per_month=2.0,
                    maintenance_usd_per_hour=50.0, hardware_usd_per_month=100.0)


def test_monthly_cost_by_hand():
    row = monthly_cost(INPUTS, 36_000_000)
    # 36M tokens at 100 t/s = 100 h; 100 h x 0.36 kW x $0.25 = $9; fixed 2 x 50 + 100 = $200
    assert row.local_energy_usd == pytest.approx(9.0)
    assert row.local_fixed_usd == pytest.approx(200.0)
    assert row.local_usd == pytest.approx(209.0)
    assert row.api_usd == pytest.approx(72.0)
    assert (row.machines, row.cheaper) == (1, "api")


def test_break_even_volume_equalises_the_two():
    be = break_even_tokens(INPUTS)
    # per token: API 2e-6, energy 0.36 * 0.25 / 360000 = 2.5e-7 -> 200 / 1.75e-6
    assert be == pytest.approx(200 / 1.75e-6)
    row = monthly_cost(INPUTS, int(be))
    assert row.local_usd == pytest.approx(row.api_usd, rel=1e-6)
    expensive_power = CostInputs(tokens_per_s=1.0, api_usd_per_1k_tokens=0.0001, power_watts=500)
    assert break_even_tokens(expensive_power) is None


def test_more_machines_beyond_one_machines_capacity():
    capacity = 100 * 3600 * HOURS_PER_MONTH
    assert INPUTS.capacity_tokens_per_month == pytest.approx(capacity)
    row = monthly_cost(INPUTS, int(capacity * 2.5))
    assert row.machines == 3 and row.local_fixed_usd == pytest.approx(600.0)


def test_table_spans_1m_to_1b_and_turns_local_at_volume():
    rows = cost_table(INPUTS)
    assert [human_tokens(r.tokens_per_month) for r in rows] == [
        "1M", "3M", "10M", "30M", "100M", "300M", "1B"]
    assert rows[0].cheaper == "api" and rows[-1].cheaper == "local"


def test_invalid_inputs_are_named():
    with pytest.raises(InvalidRequestError, match="power_watts=-1"):
        CostInputs(tokens_per_s=10, power_watts=-1)
    with pytest.raises(InvalidRequestError, match="tokens_per_s=0"):
        CostInputs(tokens_per_s=0)
    with pytest.raises(InvalidRequestError, match="tokens per month"):
        monthly_cost(INPUTS, -5)
