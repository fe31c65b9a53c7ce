"""ALDS (Liebenwein et al., NeurIPS 2021) as a data-free baseline.

Per target layer, ALDS splits the input channels into k subspaces, approximates each slice of the
weight by its own truncated SVD of rank j (in the LR-space: the kernel on a first layer grouped k
ways, then a 1x1 layer), and picks (k, j) for every layer so that the largest relative error over
the layers is as small as the budget allows.

The error of a layer is ALDS's operator-norm measure,
``max_i sigma_{j+1}(W_i) / ||W||_2``, where ``W`` is the weight unfolded to
(out_channels, in_channels x kh x kw) and ``W_i`` its i-th slice of input channels. For k = 1 it is
the exact relative operator norm of the residual; for k > 1 it is the largest per-slice residual,
a lower bound of the residual's norm within a factor sqrt(k).

The objective is a maximum of per-layer errors and the budget a sum of per-layer costs, so for a
given error bound each layer's cheapest (k, j) can be chosen on its own: bisecting the bound over
the finite set of attainable errors solves the problem exactly. ALDS's published alternation
(equalise errors for fixed k, then re-pick each k at its layer's cost) searches the same problem
and stops at one of its fixed points, never below this optimum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdnas.cost.counting import layer_cost, rank_cost
from svdnas.errors import BudgetError
from svdnas.lowrank import functional as LF
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.space import divisors
from svdnas.lowrank.spec import LowRankSpec
from svdnas.surgery.trace import LayerInfo

logger = logging.getLogger(__name__)


def _worst_singular_values(weight: Tensor, k: int) -> Tensor:
    """For each rank j, the largest (j+1)-th singular value over the k subspaces; then a 0 (CPU, float64)."""
    kernel = (weight.shape[2], weight.shape[3])
    sv = torch.linalg.svdvals(LF.unfold(weight, kernel, (k, 1)).double())  # (k, full rank)
    return torch.cat([sv.max(0).values, sv.new_zeros(1)]).cpu()


def subspace_errors(weight: Tensor, k: int) -> Tensor:
    """ALDS's relative error of every rank for k channel subspaces.

    Args:
        weight: a conv weight (O, I, kh, kw); ``k`` must divide I.

    Returns:
        float64 tensor ``e`` with ``e[j]`` the error of keeping rank j in each subspace,
        j = 0 .. full rank (``e[full] == 0``).
    """
    return _worst_singular_values(weight, k) / _worst_singular_values(weight, 1)[0].clamp_min(1e-300)


def relative_error(layer: nn.Module, specs: Sequence[LowRankSpec]) -> float:
    """ALDS's error of ``layer`` decomposed by one branch of the ALDS form; 0 when left as it is."""
    if not specs:
        return 0.0
    (spec,) = specs
    return float(subspace_errors(conv_weight(layer).detach(), spec.groups[0])[spec.rank])


def max_relative_error(model: nn.Module, plan: Plan) -> float:
    """Largest ALDS error over the layers of a plan whose branches have the ALDS form."""
    return max((relative_error(model.get_submodule(n), s) for n, s in plan.layers.items()), default=0.0)


@dataclass
class _Frontier:
    """A layer's options sorted by error, with the cheapest option among those up to each error."""

    name: str
    options: list[LowRankSpec | None]  # by ascending error; None: the layer left as it is
    errors: Tensor  # the options' errors, ascending
    cheapest: Tensor  # cheapest[p]: cost of the cheapest of the first p + 1 options
    which: Tensor  # which[p]: position of that option

    def at(self, bound: float) -> int:
        """Position of the cheapest option whose error is at most ``bound``."""
        return int(torch.searchsorted(self.errors, torch.tensor([bound], dtype=torch.float64), right=True)) - 1


def _frontier(name: str, layer: nn.Module, hw: tuple[int, int], objective: str) -> _Frontier:
    weight = conv_weight(layer).detach()
    macs0, params0 = layer_cost(layer, hw)
    cost0 = float(params0 if objective == "params" else macs0)
    kernel = (weight.shape[2], weight.shape[3])
    ks = divisors(weight.shape[1]) if isinstance(layer, nn.Conv2d) else [1]
    options: list[LowRankSpec | None] = [None]
    errors, costs = [torch.zeros(1, dtype=torch.float64)], [torch.tensor([cost0], dtype=torch.float64)]
    worst = {k: _worst_singular_values(weight, k) for k in ks}
    norm = worst[1][0].clamp_min(1e-300)  # ||W||_2
    for k in ks:
        err = worst[k] / norm
        family = LowRankSpec(kernel, (k, 1))
        base, unit = rank_cost(layer, hw, family, objective)
        top = min(len(err) - 1, math.ceil((cost0 - base) / unit) - 1)  # ranks costing less than the layer
        if top < 1:
            continue
        ranks = torch.arange(1, top + 1)
        options += [family.with_rank(int(j)) for j in ranks]
        errors.append(err[ranks])
        costs.append(base + unit * ranks.double())
    err_all, cost_all = torch.cat(errors), torch.cat(costs)
    by_cost = torch.argsort(cost_all, stable=True)
    order = by_cost[torch.argsort(err_all[by_cost], stable=True)]  # by error, ties by cost
    cost_sorted = cost_all[order]
    cheapest = torch.cummin(cost_sorted, 0).values
    # where the running minimum first drops to its value: on a tie in cost, the smaller error
    drops = torch.cat([torch.ones(1, dtype=torch.bool), cost_sorted[1:] < cheapest[:-1]])
    which = torch.cummax(torch.where(drops, torch.arange(len(order)), 0), 0).values
    return _Frontier(name, [options[int(i)] for i in order], err_all[order], cheapest, which)


def _total(frontiers: list[_Frontier], bound: float) -> float:
    return sum(float(f.cheapest[f.at(bound)]) for f in frontiers)


def alds_plan(
    model: nn.Module,
    infos: dict[str, LayerInfo],
    targets: Sequence[str],
    budget: float,
    objective: str = "flops",
) -> tuple[Plan, float]:
    """The allocation minimising the largest ALDS error with the targets' cost at most ``budget``.

    Args:
        budget: what the target layers together may cost (MACs, or params with ``objective="params"``).

    Returns:
        (plan, its largest relative error).

    Raises:
        BudgetError: if even the cheapest choice of every layer costs more than ``budget``.
    """
    frontiers = [_frontier(n, model.get_submodule(n), infos[n].input_hw, objective) for n in targets]
    bounds = torch.unique(torch.cat([f.errors for f in frontiers]))  # ascending
    cheapest = _total(frontiers, float(bounds[-1]))
    if cheapest > budget:
        raise BudgetError(f"its cheapest allocation costs {cheapest:.0f}, above the {budget:.0f} the target layers may cost")
    lo, hi = 0, len(bounds) - 1  # the smallest feasible bound lies in bounds[lo..hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if _total(frontiers, float(bounds[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    bound = float(bounds[lo])
    plan = Plan()
    worst = 0.0
    for f in frontiers:
        chosen = int(f.which[f.at(bound)])
        spec = f.options[chosen]
        plan.layers[f.name] = [spec] if spec else []
        worst = max(worst, float(f.errors[chosen]))
    logger.info("ALDS: largest relative error %.4f over %d layers", worst, len(frontiers))
    return plan, worst
