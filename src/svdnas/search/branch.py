"""One search of a branch: the super model over the candidates, its logits learned, one candidate picked per layer."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.spec import LowRankSpec
from svdnas.search.candidates import LayerCandidates
from svdnas.search.loop import SearchConfig, SearchHistory, search
from svdnas.search.select import select_within_budget
from svdnas.search.supernet import build_supernet, window_dtype


def choose(
    scores: list[list[float]], costs: list[list[float]], reduction: float | None, total: float, fixed: float,
    upgrades: list[list[int | None]] | None = None,
) -> list[int]:
    """One candidate index per layer: with a ``reduction``, the best-scoring within the budget (see
    :func:`svdnas.search.select.select_within_budget`); without one (``beta``), each layer's largest logit."""
    if reduction is not None:
        return select_within_budget(scores, costs, (1 - reduction) * total, fixed, upgrades)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def search_branch(
    model: nn.Module,
    candidates: dict[str, LayerCandidates],
    costs: dict[str, list[float]],
    fixed: float,
    total: float,
    reduction: float | None,
    sconf: SearchConfig,
    subset,
    device,
    seed: int,
    progress,
    seconds: dict[str, float],
    prefix: str,
    checkpoint_dir: Path | None = None,
    derivation: Derivation | None = None,
) -> tuple[dict[str, list[LowRankSpec]], SearchHistory]:
    """Build the super model over ``candidates``, learn its logits, pick one candidate per layer.

    With a ``reduction`` the pick is the best-scoring one within the budget (see
    :func:`svdnas.search.select.select_within_budget`); without one (``beta``) each layer's largest logit.
    ``seconds`` receives the build, search and select times under ``prefix``.
    """
    t0 = time.perf_counter()
    supernet, mixed = build_supernet(model, candidates, sconf.sampling, window_dtype(sconf.window_dtype, device), derivation)
    supernet.to(device)
    seconds[prefix + "build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    steps = -(-len(subset) // sconf.batch_size)

    def on_step(step: int, epoch: int) -> None:
        if progress is not None:
            progress(prefix + "search", epoch * steps + step + 1, sconf.epochs * steps)

    # the search's cost terms see the layers outside this search at their current cost
    ckpt = Path(checkpoint_dir) / f"checkpoint-{prefix or 'b1_'}search.pt" if checkpoint_dir is not None else None
    names = list(mixed)
    upgrades = [candidates[n].next_rank() for n in names]

    def select() -> list[int]:
        return choose([mixed[n].theta.detach().cpu().tolist() for n in names], [costs[n] for n in names], reduction, total, fixed, upgrades)

    history = search(supernet, mixed, subset, sconf, costs, total, device, seed, on_step, fixed=fixed, checkpoint=ckpt, select=select)
    seconds[prefix + "search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = [mixed[n].theta.detach().cpu().tolist() for n in names]
    choice = select()
    chosen = {n: candidates[n].branches(c) for n, c in zip(names, choice)}
    history.logits = dict(zip(names, scores))
    history.choice = dict(zip(names, choice))
    seconds[prefix + "select"] = time.perf_counter() - t0
    return chosen, history
