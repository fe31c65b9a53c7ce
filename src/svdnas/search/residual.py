"""The residual extension: candidates of a second branch over what the first search's branch left."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from svdnas.cost.counting import layer_cost
from svdnas.lowrank.plan import Plan
from svdnas.search.candidates import LayerCandidates, fraction_grid, grid_candidates, limit_groups
from svdnas.surgery.trace import LayerInfo


def second_branch_candidates(
    model: nn.Module, infos: dict[str, LayerInfo], plan: Plan, costs: dict[str, list[float]], total: float,
    objective: str, max_groups: int | None, rank_multiple: Callable[[str, int], int] | None = None,
) -> tuple[dict[str, LayerCandidates], float]:
    """Candidates of the second search: each compressed layer's first branch loses the ranks worth
    20% of the original layer's cost (at least one, or a whole multiple), and second branches over
    its residual fill between 5% and min(1 - first branch's share, 40%) of the original cost.
    ``rank_multiple(layer, first branch's rank)`` gives the multiple both branches' ranks keep (None: 1).
    Returns them and the cost of everything outside the second search."""
    cands2: dict[str, LayerCandidates] = {}
    outside = total - sum(c[0] for c in costs.values())
    for name, specs in plan.layers.items():
        layer = model.get_submodule(name)
        hw = infos[name].input_hw
        pick = (lambda mp: mp[1]) if objective == "params" else (lambda mp: mp[0])
        cost0 = pick(layer_cost(layer, hw))
        if not specs:
            outside += cost0 if name in costs else 0.0
            continue
        b1 = specs[0]
        unit = pick(layer_cost(layer, hw, [b1.with_rank(2)])) - pick(layer_cost(layer, hw, [b1.with_rank(1)])) if b1.rank > 1 else pick(layer_cost(layer, hw, [b1]))
        withdraw = max(1, math.ceil(0.2 * cost0 / max(unit, 1)))
        multiple = rank_multiple(name, b1.rank) if rank_multiple is not None else 1
        withdraw = multiple * math.ceil(withdraw / multiple)
        if multiple > 1 and b1.rank - withdraw < multiple:  # no whole block left to give up
            outside += pick(layer_cost(layer, hw, [b1]))
            continue
        relaxed = b1.with_rank(max(1, b1.rank - withdraw))
        share = pick(layer_cost(layer, hw, [relaxed])) / cost0
        top = min(1 - share, 0.40)
        if top < 0.05:
            outside += pick(layer_cost(layer, hw, [b1]))
            continue
        fractions = fraction_grid(0.05, math.floor(top / 0.05 + 1e-9) * 0.05)
        cands = limit_groups(grid_candidates(name, layer, hw, fractions, objective, prefix=[relaxed], rank_multiple=multiple),
                              max_groups)
        if cands.specs:
            # index 0 is the first branch as the first search left it, not the original layer
            cands.base = [b1]
            cands.macs[0], cands.params[0] = layer_cost(layer, hw, [b1])
            cands2[name] = cands
        else:
            outside += pick(layer_cost(layer, hw, [b1]))
    return cands2, outside
