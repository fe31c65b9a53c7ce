"""A latency budget met on the whole model as it runs, not on the lookup table's sum.

The lookup table times each layer alone, in PyTorch; the whole model's latency in the runtime it is
deployed with is not the sum of those (fusions, memory layouts and fixed costs differ), so a plan
that meets the budget on the table can miss it on the model. After the selection the compressed
model is therefore timed end to end against the original (interleaved, in the report's runtime,
batch and threads). While it falls short, the selection runs again under the table's budget scaled
by the shortfall: the table calibrated on the whole-model measurements, assuming the measured
latency follows the predicted one in proportion. It stops when the measured reduction is within
``tolerance`` of the target, when no plan of the candidates fits the scaled budget, or after
``rounds`` repairs; the plan returned is then the measured fastest, and the caller says that the
target was not reached and what was.
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
        measured ``original_ms``, ``compressed_ms`` and ``reduction``."""
        return {"met": self.met, "repairs": len(self.attempts) - 1, "kept": self.kept, "attempts": self.attempts}


def meet_measured_budget(
    select: Callable[[float], PlanT],
    predicted: Callable[[PlanT], float],
    measure: Callable[[PlanT], dict[str, float]],
    reduction: float,
    budget: float,
    *,
    tolerance: float = 0.01,
    rounds: int = 4,
) -> MeasuredBudget[PlanT]:
    """Select under ``budget``, measure, and select again under a scaled budget until the measured
    reduction is at least ``reduction - tolerance``.

    Args:
        select: the plan that best fits a budget on the table (raises :class:`BudgetError` when none fits).
        predicted: a plan's cost on the table (the budget's units).
        measure: a plan's measured ``original_ms``, ``compressed_ms`` and ``reduction``.
        reduction: the target share of the measured latency to remove.
        budget: the table's budget of the first selection.
        tolerance: how far below the target the measured reduction may fall.
        rounds: repairs at most.
    """
    plan = select(budget)
    attempts: list[dict[str, Any]] = []
    best: tuple[float, PlanT] | None = None
    for k in range(rounds + 1):
        cost = predicted(plan)
        figures = measure(plan)
        attempts.append({"budget": budget, "predicted": cost, **figures})
        log.info("latency budget, selection %d: measured reduction %.4f (target %.4f)", k + 1, figures["reduction"], reduction)
        if best is None or figures["reduction"] > best[0]:
            best = (figures["reduction"], plan)
        if figures["reduction"] >= reduction - tolerance or k == rounds:
            break
        # the measured ratio over the target ratio, applied to the plan's own cost on the table
        budget = cost * (1 - reduction) / max(1 - figures["reduction"], 1e-9)
        try:
            plan = select(budget)
        except BudgetError:
            log.info("latency budget: no plan of the candidates fits %.4g on the table", budget)
            break
    assert best is not None
    met = best[0] >= reduction - tolerance
    kept = next(i for i in reversed(range(len(attempts))) if attempts[i]["reduction"] == best[0])
    if not met:
        log.warning(
            "the measured latency reduction reached %.4f, short of the target %.4f: the candidates cannot remove more "
            "in this runtime (a lower --reduction, a wider --grid or more families may)", best[0], reduction,
        )
    return MeasuredBudget(best[1], met, attempts, kept)


__all__ = ["MeasuredBudget", "meet_measured_budget"]
