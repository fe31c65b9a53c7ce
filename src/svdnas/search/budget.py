"""Whether a budget can be met by the candidates at hand, and what can be reached when it cannot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from svdnas.cost.counting import layer_cost
from svdnas.errors import BudgetError
from svdnas.lowrank.space import kernel_splits
from svdnas.lowrank.spec import LowRankSpec
from svdnas.search.candidates import LayerCandidates
from svdnas.surgery.trace import LayerInfo


def round_down(x: float) -> str:
    """A reachable share rounded down, so that "at most" stays true."""
    return f"{math.floor(x * 1000) / 1000:.3f}"


def rank_one_reach(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str], objective: str, total: float) -> float:
    """The largest reduction there is: every target layer at its cheapest rank-1 branch (or left
    as it is where even that costs more)."""
    pick = 1 if objective == "params" else 0
    saved = 0.0
    for name in targets:
        layer = model.get_submodule(name)
        hw = infos[name].input_hw
        cost0 = layer_cost(layer, hw)[pick]
        kernel = (1, 1) if isinstance(layer, nn.Linear) else tuple(layer.kernel_size)
        # groups widen the join of a rank-1 branch, so the cheapest is ungrouped
        cheapest = min(layer_cost(layer, hw, [LowRankSpec(a, (1, 1), 1)])[pick] for a in kernel_splits(kernel))
        saved += max(0.0, cost0 - cheapest)
    return saved / total


def cheapest_total(costs: dict[str, list[float]], total: float) -> float:
    """The model's cost with every layer at its cheapest candidate (index 0 is the original)."""
    return total - sum(c[0] - min(c) for c in costs.values())


def check_budget(
    candidates: dict[str, LayerCandidates], objective: str, reduction: float | None, total: float, reach: Callable[[], float]
) -> dict[str, list[float]]:
    """Per-layer candidate costs on ``objective``; raises BudgetError when ``reduction`` cannot be reached.

    Args:
        reach: the largest reduction at rank 1 in every target layer (called only on failure).
    """
    costs = {n: c.cost(objective) for n, c in candidates.items()}
    floor = cheapest_total(costs, total)
    if reduction is not None and floor > (1 - reduction) * total:
        best = reach()
        what = "FLOPs" if objective == "flops" else objective
        if best < reduction:
            raise BudgetError(
                f"--reduction {reduction} cannot be met: even rank 1 in every target layer removes at most "
                f"{round_down(best)} of the {what}; ask for at most that, or target more layers with --filter"
            )
        raise BudgetError(
            f"--reduction {reduction} cannot be met by the candidates kept: the smallest remove "
            f"{round_down(1 - floor / total)} of the {what} (rank 1 everywhere would remove {round_down(best)}); "
            "widen --grid (e.g. --grid 0.01:0.5), pass --families 0 or lower the reduction"
        )
    return costs
