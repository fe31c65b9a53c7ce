"""Turning learned logits into a plan that meets a budget: a multiple-choice knapsack.

Each layer picks one candidate. ``select_within_budget`` maximises the summed logits (the
search's learned preference; log-probabilities differ from them by a per-layer constant) subject
to total cost <= budget, by dynamic programming over costs rounded up to a fine grid (so the
budget is never exceeded), then spends what rounding and the logits left over along each layer's
family ranks, which are at least as accurate as the rank below them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from svdnas.errors import BudgetError


def _total(choice: list[int], costs: Sequence[Sequence[float]]) -> float:
    return sum(k[c] for c, k in zip(choice, costs))


def _knapsack(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], room: float, bins: int) -> list[int]:
    unit = room / bins
    dp = np.full(bins + 1, -np.inf)
    dp[0] = 0.0
    dp = np.maximum.accumulate(dp)  # dp[b]: best score with total rounded cost <= b
    picks = []
    for s, k in zip(scores, costs):
        new = np.full(bins + 1, -np.inf)
        arg = np.zeros(bins + 1, dtype=np.int64)
        for c, (score, cost) in enumerate(zip(s, k)):
            w = math.ceil(cost / unit - 1e-9)
            if w > bins:
                continue
            cand = np.full(bins + 1, -np.inf)
            cand[w:] = dp[: bins + 1 - w] + score
            better = cand > new
            new[better] = cand[better]
            arg[better] = c
        dp = new
        picks.append(arg)
    b = int(np.argmax(dp))
    if not np.isfinite(dp[b]):
        raise BudgetError("budget cannot be met")
    choice = []
    for s, k, arg in zip(reversed(scores), reversed(costs), reversed(picks)):
        c = int(arg[b])
        choice.append(c)
        b -= math.ceil(k[c] / unit - 1e-9)
    return choice[::-1]


def select_within_budget(
    scores: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    fixed: float = 0.0,
    upgrades: Sequence[Sequence[int | None]] | None = None,
    bins: int = 4000,
) -> list[int]:
    """One candidate index per layer with total cost + ``fixed`` <= ``budget`` and summed score maximal
    (exactly, for costs rounded up to ``budget / bins``).

    Args:
        upgrades: per layer and candidate, a costlier candidate known to be at least as accurate
            (the next rank of the same family); slack the scores leave is spent on these, the
            layer whose upgrade loses least score first.

    Raises:
        BudgetError: if even the cheapest candidate of every layer does not fit.
    """
    room = budget - fixed
    if room <= 0 or sum(min(k) for k in costs) > room + 1e-9:
        raise BudgetError("budget cannot be met")
    choice = _knapsack(scores, costs, room, bins)
    if upgrades is None:
        return choice
    while True:
        slack = room - _total(choice, costs)
        moves = [
            (scores[layer][nxt] - scores[layer][cur], layer, nxt)
            for layer, cur in enumerate(choice)
            if (nxt := upgrades[layer][cur]) is not None and costs[layer][nxt] - costs[layer][cur] <= slack
        ]
        if not moves:
            return choice
        _, layer, nxt = max(moves)
        choice[layer] = nxt
