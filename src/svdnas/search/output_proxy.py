"""Data-aware pruning of families: keep, per layer, the families whose candidate near the target
cost reproduces the layer's output best.

With the paper's weight derivation the error is measured on held-out proxy images: only the layer
itself runs for each candidate, its inputs captured once for every target layer in a single forward
pass of the original model. With an output-aware derivation the error is read from the family's
whitened spectrum (the energy its rank drops, under the calibration moments), with no convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from svdnas.data.evaluate import batches
from svdnas.hooks import evaluation_mode, forward_hooks
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.whiten import rank_errors
from svdnas.search.candidates import LayerCandidates


@torch.no_grad()
def capture_inputs(model: nn.Module, names: Sequence[str], data: Dataset, device, batch_size: int = 128) -> dict[str, Tensor]:
    """Inputs of the layers ``names`` on every image of ``data`` (one forward pass per batch)."""
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    keep = ((model.get_submodule(n), lambda m, a, n=n: store[n].append(a[0].detach())) for n in names)
    with evaluation_mode(model), forward_hooks(keep, pre=True):
        for x, _ in batches(data, batch_size):
            model(x.to(device))
    return {n: torch.cat(v) for n, v in store.items()}


@torch.no_grad()
def output_errors(
    layer: nn.Module, x: Tensor | None, cands: LayerCandidates, kept: float, derivation: Derivation | None = None,
    objective: str = "flops",
) -> dict[tuple, float]:
    """Relative output error of each family's candidate whose cost on ``objective`` is nearest ``kept``
    x the original's (factors derived by ``derivation``; the paper's weight SVD when None).

    Latencies are not measured yet when this runs, so the latency objective reads MACs here.
    """
    derivation = derivation or Derivation()
    best = _nearest(cands, kept, objective)
    if not derivation.plain:
        return spectrum_errors(layer, cands, best, derivation)
    y = layer(x)
    norm = y.pow(2).sum().clamp_min(1e-12)
    errors = {}
    for fam, i in best.items():
        approx = derivation.block(cands.name, layer, [*cands.prefix, cands.specs[i - 1]])(x)
        errors[fam] = ((approx - y).pow(2).sum() / norm).item()
    return errors


def _nearest(cands: LayerCandidates, kept: float, objective: str) -> dict[tuple, int]:
    """Per family, the index (1-based) of its candidate whose cost is nearest ``kept`` x the original's."""
    cost = cands.macs if objective == "latency" else cands.cost(objective)
    target = kept * cost[0]
    best: dict[tuple, int] = {}
    for i, spec in enumerate(cands.specs, start=1):
        fam = spec.family()
        if fam not in best or abs(cost[i] - target) < abs(cost[best[fam]] - target):
            best[fam] = i
    return best


@torch.no_grad()
def spectrum_errors(layer: nn.Module, cands: LayerCandidates, best: dict[tuple, int], derivation: Derivation) -> dict[tuple, float]:
    """Per family, the relative error of its candidate ``best[family]`` read from the whitened spectrum:
    the squared singular values its rank drops over all of them (exact for a family whose first layer
    holds the whole kernel ungrouped; the pooled moment's error for the others)."""
    weight = conv_weight(layer).detach()
    if cands.prefix:  # a later branch approximates what the earlier ones left
        weight = weight - derivation.dense(cands.name, layer, cands.prefix).to(weight)
    errors = {}
    for fam, i in best.items():
        errors[fam] = relative_error(rank_errors(derivation.spectrum(cands.name, weight, fam)), cands.specs[i - 1].rank)
    return errors


def relative_error(tails: Tensor, rank: int) -> float:
    """The relative output error of ``rank`` given :func:`svdnas.lowrank.whiten.rank_errors` of its family."""
    return float(tails[min(rank, len(tails) - 1)] / tails[0].clamp_min(1e-300))


def keep_families(cands: LayerCandidates, errors: dict[tuple, float], k: int) -> LayerCandidates:
    """Only the ``k`` families with the smallest errors (all when k <= 0)."""
    if k <= 0 or len(errors) <= k:
        return cands
    chosen = set(sorted(errors, key=errors.__getitem__)[:k])
    return cands.subset(lambda s: s.family() in chosen)
