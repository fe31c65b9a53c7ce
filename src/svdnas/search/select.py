"""Turning learned logits into a plan that meets a budget: a multiple-choice knapsack.

Each layer picks one candidate. ``select_within_budget`` maximises the summed logits (the
search's learned preference; log-probabilities differ from them by a per-layer constant) subject
to total cost <= budget: a Lagrangian relaxation, bisected on the price of cost, then a greedy
fill that spends what the relaxation left over on the upgrades that gain most logit per unit cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from svdnas.errors import BudgetError


def _choose(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], price: float) -> list[int]:
    return [max(range(len(s)), key=lambda c: (s[c] - price * k[c], -k[c])) for s, k in zip(scores, costs)]


def _total(choice: list[int], costs: Sequence[Sequence[float]]) -> float:
    return sum(k[c] for c, k in zip(choice, costs))


def select_within_budget(
    scores: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    fixed: float = 0.0,
    upgrades: Sequence[Sequence[int | None]] | None = None,
) -> list[int]:
    """One candidate index per layer, total cost + ``fixed`` <= ``budget``, summed score maximal (approx.).

    Args:
        upgrades: per layer and candidate, a costlier candidate known to be at least as accurate
            (the next rank of the same family); slack the scores leave is spent on these, the
            layer whose upgrade loses least score first.

    Raises:
        BudgetError: if even the cheapest candidate of every layer does not fit.
    """
    room = budget - fixed
    cheapest = [min(range(len(k)), key=lambda c: k[c]) for k in costs]
    if _total(cheapest, costs) > room + 1e-9:
        raise BudgetError("budget cannot be met")
    choice = _choose(scores, costs, 0.0)
    if _total(choice, costs) > room:
        lo, hi = 0.0, 1.0
        while _total(_choose(scores, costs, hi), costs) > room:
            hi *= 2.0
            if hi > 1e30:
                choice = cheapest
                break
        else:
            for _ in range(100):
                mid = (lo + hi) / 2
                if _total(_choose(scores, costs, mid), costs) > room:
                    lo = mid
                else:
                    hi = mid
            choice = _choose(scores, costs, hi)
    # greedy fill of the slack
    while True:
        slack = room - _total(choice, costs)
        best, best_gain = None, 0.0
        for layer, (s, k) in enumerate(zip(scores, costs)):
            cur = choice[layer]
            for c in range(len(s)):
                extra = k[c] - k[cur]
                gain = s[c] - s[cur]
                if gain > 0 and extra <= slack:
                    ratio = gain / max(extra, 1e-12)
                    if best is None or ratio > best_gain:
                        best, best_gain = (layer, c), ratio
        if best is None:
            break
        choice[best[0]] = best[1]
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
