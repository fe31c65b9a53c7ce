"""A second plan from the spectra alone, and the check that keeps the better of it and the search's.

With an output-aware derivation every candidate's relative output error is read from its family's
whitened spectrum, with no image. Minimising the summed errors within the budget (the same
multiple-choice knapsack as the search's selection) is BALF's allocation, but over the families
the search kept, at every rank of the whole grid: where the search's candidates are a window
around the target, the allocation may compress a few layers far and leave the rest, as BALF does.
At small reductions, where the search's loss barely separates its options, this plan can be the
better one; elsewhere the search's. Both are scored on the held-out proxy images by
the mean KL divergence of the compressed model's softmax from the original's (no label needed,
so it works on synthetic images too), and the lower is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from svdnas.data.evaluate import batches
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.whiten import rank_errors
from svdnas.search.candidates import LayerCandidates
from svdnas.surgery.swap import apply_plan


@torch.no_grad()
def spectrum_scores(model: nn.Module, candidates: dict[str, LayerCandidates], derivation: Derivation) -> dict[str, list[float]]:
    """Per layer, minus each candidate's relative output error read from its family's spectrum
    (0 for the original layer, index 0); one spectrum per family."""
    scores = {}
    for name, cands in candidates.items():
        weight = conv_weight(model.get_submodule(name)).detach()
        tails = {fam: rank_errors(derivation.spectrum(name, weight, fam)) for fam in {s.family() for s in cands.specs}}
        row = [0.0]
        for spec in cands.specs:
            t = tails[spec.family()]
            row.append(-float(t[min(spec.rank, len(t) - 1)] / t[0].clamp_min(1e-300)))
        scores[name] = row
    return scores


@torch.no_grad()
def mean_kl(original: nn.Module, compressed: nn.Module, images: Dataset, device, batch_size: int = 128) -> float:
    """Mean KL divergence of ``compressed``'s softmax from ``original``'s over ``images``."""
    total, count = 0.0, 0
    for x, _ in batches(images, batch_size):
        x = x.to(device)
        p = F.log_softmax(original(x).float(), -1)
        q = F.log_softmax(compressed(x).float(), -1)
        total += F.kl_div(q, p, log_target=True, reduction="sum").item()
        count += len(x)
    return total / max(count, 1)


def better_plan(
    model: nn.Module, plans: dict[str, Plan], images: Dataset, device, derivation: Derivation,
) -> tuple[str, dict[str, Any]]:
    """The name of the plan in ``plans`` whose compressed model (factors from ``derivation``) is
    nearest the original on ``images`` by :func:`mean_kl`, and each plan's score. Plans that are
    equal are scored once; ties keep the first."""
    was_training = model.training
    model.eval()
    scores: dict[str, float] = {}
    try:
        seen: dict[str, str] = {}
        for key, plan in plans.items():
            text = plan.to_json()
            if text in seen:
                scores[key] = scores[seen[text]]
                continue
            seen[text] = key
            compressed = apply_plan(copy.deepcopy(model), plan, derivation=derivation).eval()
            scores[key] = mean_kl(model, compressed, images, device)
    finally:
        model.train(was_training)
    best = min(scores, key=lambda k: (scores[k], list(plans).index(k)))
    return best, {"kl": scores, "kept": best, "images": len(images)}


def choices_to_plan(targets: Sequence[str], candidates: dict[str, LayerCandidates], choice: dict[str, int]) -> Plan:
    return Plan({n: candidates[n].branches(choice[n]) if n in choice else [] for n in targets})


__all__ = ["better_plan", "choices_to_plan", "mean_kl", "spectrum_scores"]
