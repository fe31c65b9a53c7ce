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


def test_a_plan_far_faster_than_asked_is_traded_for_a_looser_one_that_still_meets_the_target():
    calls = []

    def measure(plan: float) -> dict[str, float]:  # the runtime rewards small layers more than the table says
        calls.append(plan)
        return {"original_ms": 100.0, "compressed_ms": plan * plan / 100, "reduction": 1 - plan * plan / 10000}

    result = meet_measured_budget(select, lambda p: p, measure, 0.4, 60.0, tolerance=0.01, slack=0.03)
    assert result.attempts[0]["reduction"] > 0.6  # the table's plan removes far more than asked
    kept = result.attempts[result.kept]
    assert result.met and 0.39 <= kept["reduction"] <= 0.43 and result.plan > 60.0
    assert "calibrated_reduction" not in result.attempts[0]
    assert result.kept > 0  # the calibrated table predicts the kept plan better than the raw table did
    assert abs(kept["calibrated_reduction"] - kept["reduction"]) < abs((1 - kept["predicted"] / 100) - kept["reduction"]) / 4


def test_without_slack_an_overshoot_is_kept():
    measure, calls = measured(overhead=0.0, scale=1.0)
    result = meet_measured_budget(select, lambda p: p, lambda p: {**measure(p), "reduction": 0.9}, 0.4, 60.0, slack=float("inf"))
    assert result.plan == 60.0 and len(calls) == 1


def test_an_overshoot_with_budget_to_spare_still_tries_a_looser_budget():
    sparse = [10.0, 20.0, 72.0, 100.0]  # a budget of 70 selects 20, far below it

    def select_sparse(budget: float) -> float:
        fits = [c for c in sparse if c <= budget]
        if not fits:
            raise BudgetError("budget cannot be met")
        return max(fits)

    measure, calls = measured(overhead=0.0)
    result = meet_measured_budget(select_sparse, lambda p: p, measure, 0.27, 70.0, tolerance=0.01, slack=0.03)
    # 20 removes 80% against 27% asked; the calibrated step (73) is above the budget already seen to meet
    assert calls == [20.0, 72.0] and result.met and result.plan == 72.0


def test_a_budget_whose_selection_was_measured_already_narrows_the_bracket_instead():
    sparse = [20.0, 40.0, 60.0, 100.0]
    selected = []

    def select_sparse(budget: float) -> float:
        selected.append(budget)
        return max(c for c in sparse if c <= budget)

    def measure(plan: float) -> dict[str, float]:  # 60 misses 0.5 by far, 40 overshoots it: nothing lands in the window
        r = {20.0: 0.9, 40.0: 0.8, 60.0: 0.2, 100.0: 0.0}[plan]
        return {"original_ms": 1.0, "compressed_ms": 1 - r, "reduction": r}

    result = meet_measured_budget(select_sparse, lambda p: p, measure, 0.5, 60.0, tolerance=0.01, slack=0.03, rounds=6)
    measured_plans = [a["predicted"] for a in result.attempts]
    assert len(measured_plans) == len(set(measured_plans))  # no plan measured twice
    assert result.met and result.plan == 40.0  # the slowest plan that met the target
