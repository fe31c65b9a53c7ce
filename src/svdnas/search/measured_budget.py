"""A latency budget met on the whole model as it runs, not on the lookup table's sum.

The lookup table times each layer alone; the whole model's latency in the runtime it is deployed
with is not the sum of those (fusions, memory layouts and each call's fixed costs differ), so a plan
that meets the budget on the table can miss it on the model, or beat it by far and give away
accuracy. After the selection the compressed model is therefore timed end to end against the
original (interleaved, in the report's runtime, batch and threads). While its measured reduction is
outside ``[target - tolerance, target + slack]``, the selection runs again under the table's budget
scaled by the measured ratio: the table calibrated on the whole-model measurement, assuming the
measured latency follows the predicted one in proportion (each attempt records that calibrated
prediction beside the measurement). Budgets already seen to meet or to miss the target bracket the
next one; a budget whose selection gives a plan already measured takes that plan's result and the
bracket is halved instead. It stops when a measurement lands in the window, when no new plan comes
out of the bracket, when no plan of the candidates fits, or after ``rounds`` repairs. The plan kept is the
measured slowest of those that meet the target (the most accurate the search offers within the
budget), else the measured fastest, and the caller says that the target was not reached and what was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from svdnas.errors import BudgetError

log = logging.getLogger(__name__)
PlanT = TypeVar("PlanT")


@dataclass
class MeasuredBudget(Generic[PlanT]):
    """The plan chosen on measured latency and how it was reached.

    Attributes:
        plan: the plan kept.
        met: whether its measured reduction is within the tolerance of the target.
        attempts: per selection, the table's budget, the predicted and the measured figures.
    """

    plan: PlanT
    met: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        """``met``, ``repairs`` (selections after the first), ``kept`` (the attempt whose plan is kept)
        and ``attempts``: each selection's ``budget`` and ``predicted`` cost on the table and its
        measured ``original_ms``, ``compressed_ms`` and ``reduction``; after the first, also the
        ``calibrated_reduction`` the table predicted once calibrated on the previous measurement."""
        return {"met": self.met, "repairs": len(self.attempts) - 1, "kept": self.kept, "attempts": self.attempts}


def meet_measured_budget(
    select: Callable[[float], PlanT],
    predicted: Callable[[PlanT], float],
    measure: Callable[[PlanT], dict[str, float]],
    reduction: float,
    budget: float,
    *,
    tolerance: float = 0.01,
    slack: float = 0.03,
    rounds: int = 4,
) -> MeasuredBudget[PlanT]:
    """Select under ``budget``, measure, and select again under a scaled budget until the measured
    reduction is in ``[reduction - tolerance, reduction + slack]``.

    Args:
        select: the plan that best fits a budget on the table (raises :class:`BudgetError` when none fits).
        predicted: a plan's cost on the table (the budget's units).
        measure: a plan's measured ``original_ms``, ``compressed_ms`` and ``reduction``.
        reduction: the target share of the measured latency to remove.
        budget: the table's budget of the first selection.
        tolerance: how far below the target the measured reduction may fall.
        slack: how far above the target it may rise before a looser budget is tried (inf: never).
        rounds: repairs at most.
    """
    plan = select(budget)
    attempts: list[dict[str, Any]] = []
    plans: list[PlanT] = []
    meets, misses = float("-inf"), float("inf")  # the largest budget seen to meet, the smallest seen to miss
    calibrated = None
    for k in range(rounds + 1):
        cost = predicted(plan)
        figures = measure(plan)
        attempt = {"budget": budget, "predicted": cost, **figures}
        if calibrated is not None:
            attempt["calibrated_reduction"] = 1 - cost * calibrated
        attempts.append(attempt)
        plans.append(plan)
        r = figures["reduction"]
        log.info("latency budget, selection %d: measured reduction %.4f (target %.4f)", k + 1, r, reduction)
        if r >= reduction - tolerance:
            meets = max(meets, budget)
        else:
            misses = min(misses, budget)
        if reduction - tolerance <= r <= reduction + slack or k == rounds:
            break
        # the table calibrated on this measurement: measured compressed / original per unit of the table
        calibrated = max(1 - r, 1e-9) / max(cost, 1e-12)
        step = (1 - reduction) / calibrated
        if not meets < step < misses:  # the plan used less of its budget than the step assumes
            if misses == float("inf") or meets == float("-inf"):  # one side seen: scale the last budget itself
                step = budget * (1 - reduction) / max(1 - r, 1e-9)
            else:  # halve the bracket
                step = (meets + misses) / 2
        next_plan = _next_plan(select, predicted, plans, attempts, step, meets, misses, reduction - tolerance)
        if next_plan is None:
            break
        plan, budget, meets, misses = next_plan
    met_at = [i for i, a in enumerate(attempts) if a["reduction"] >= reduction - tolerance]
    if met_at:
        kept = min(met_at, key=lambda i: attempts[i]["reduction"])
    else:
        kept = max(range(len(attempts)), key=lambda i: attempts[i]["reduction"])
        log.warning(
            "the measured latency reduction reached %.4f, short of the target %.4f: the candidates cannot remove more "
            "in this runtime (a lower --reduction, a wider --grid or more families may)", attempts[kept]["reduction"], reduction,
        )
    return MeasuredBudget(plans[kept], bool(met_at), attempts, kept)


def _next_plan(select, predicted, plans, attempts, budget, meets, misses, floor, tries: int = 12):
    """The plan to measure next, selected under ``budget``; when the selection gives a plan already
    measured, its known result narrows the bracket and the bracket is halved, until a new plan comes
    (returned with its budget and the bracket) or none can (None)."""
    costs = [predicted(p) for p in plans]
    for _ in range(tries):
        try:
            plan = select(budget)
        except BudgetError:
            log.info("latency budget: no plan of the candidates fits %.4g on the table", budget)
            return None
        cost = predicted(plan)
        if cost not in costs:
            return plan, budget, meets, misses
        if attempts[costs.index(cost)]["reduction"] >= floor:  # that plan met the target: so does this budget
            meets = max(meets, budget)
        else:
            misses = min(misses, budget)
        if meets == float("-inf") or misses == float("inf") or misses - meets <= 1e-6 * abs(misses):
            return None
        budget = (meets + misses) / 2
    return None


__all__ = ["MeasuredBudget", "meet_measured_budget"]
