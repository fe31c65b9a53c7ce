import pytest

from svdnas.errors import BudgetError
from svdnas.search.measured_budget import meet_measured_budget

GRID = [float(c) for c in range(10, 101)]  # plans are their cost on the table, 10..100


def select(budget: float) -> float:
    fits = [c for c in GRID if c <= budget]
    if not fits:
        raise BudgetError("budget cannot be met")
    return max(fits)


def measured(overhead: float, scale: float = 1.0):
    """A runtime whose whole model costs ``scale`` x the table's sum plus a fixed ``overhead``."""
    calls = []

    def measure(plan: float) -> dict[str, float]:
        calls.append(plan)
        before, after = overhead + scale * 100.0, overhead + scale * plan
        return {"original_ms": before, "compressed_ms": after, "reduction": 1 - after / before}

    return measure, calls


def test_a_plan_that_meets_the_budget_on_the_model_is_kept_as_selected():
    measure, calls = measured(0.0)
    result = meet_measured_budget(select, lambda p: p, measure, 0.4, 60.0)
    assert result.plan == 60.0 and result.met and calls == [60.0] and result.to_dict()["repairs"] == 0


def test_a_shortfall_on_the_model_is_repaired_until_the_measured_reduction_meets_the_target():
    measure, calls = measured(overhead=30.0)  # fixed costs the table does not see: 60 on the table measures 30% less, not 40%
    result = meet_measured_budget(select, lambda p: p, measure, 0.4, 60.0, tolerance=0.01)
    first, kept = result.attempts[0], result.attempts[result.kept]
    assert first["reduction"] < 0.39  # the table's plan falls short on the model
    assert result.met and kept["reduction"] >= 0.39 and len(calls) > 1
    assert result.plan == kept["predicted"] < 60.0  # a cheaper plan on the table
    assert result.to_dict()["repairs"] == len(result.attempts) - 1


def test_an_unreachable_target_keeps_the_fastest_plan_measured_and_says_so():
    measure, _ = measured(overhead=300.0)  # even the cheapest plan removes at most 90 / 400 = 22.5%
    result = meet_measured_budget(select, lambda p: p, measure, 0.4, 60.0, rounds=6)
    assert not result.met
    assert result.plan == min(a["predicted"] for a in result.attempts)
    assert result.attempts[result.kept]["reduction"] == max(a["reduction"] for a in result.attempts) < 0.4


@pytest.mark.parametrize("rounds", [0, 1, 2])
def test_repairs_stop_after_the_given_rounds(rounds):
    measure, calls = measured(overhead=300.0)
    meet_measured_budget(select, lambda p: p, measure, 0.4, 60.0, rounds=rounds)
    assert len(calls) <= rounds + 1
