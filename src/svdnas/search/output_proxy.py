"""Data-aware pruning of families: keep, per layer, the families whose candidate near the target
cost reproduces the layer's output best on held-out proxy images.

Only the layer itself runs for each candidate: its inputs are captured once for every target
layer in a single forward pass of the original model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from svdnas.data.evaluate import batches
from svdnas.hooks import forward_hooks
from svdnas.lowrank.derivation import Derivation
from svdnas.search.candidates import LayerCandidates


@torch.no_grad()
def capture_inputs(model: nn.Module, names: Sequence[str], data: Dataset, device, batch_size: int = 128) -> dict[str, Tensor]:
    """Inputs of the layers ``names`` on every image of ``data`` (one forward pass per batch)."""
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    keep = ((model.get_submodule(n), lambda m, a, n=n: store[n].append(a[0].detach())) for n in names)
    was_training = model.training
    model.eval()
    try:
        with forward_hooks(keep, pre=True):
            for x, _ in batches(data, batch_size):
                model(x.to(device))
    finally:
        model.train(was_training)
    return {n: torch.cat(v) for n, v in store.items()}


@torch.no_grad()
def output_errors(
    layer: nn.Module, x: Tensor, cands: LayerCandidates, kept: float, derivation: Derivation | None = None,
    objective: str = "flops",
) -> dict[tuple, float]:
    """Relative output error of each family's candidate whose cost on ``objective`` is nearest ``kept``
    x the original's (factors derived by ``derivation``; the paper's weight SVD when None).

    Latencies are not measured yet when this runs, so the latency objective reads MACs here.
    """
    derivation = derivation or Derivation()
    cost = cands.macs if objective == "latency" else cands.cost(objective)
    y = layer(x)
    norm = y.pow(2).sum().clamp_min(1e-12)
    target = kept * cost[0]
    best: dict[tuple, int] = {}
    for i, spec in enumerate(cands.specs, start=1):
        fam = spec.family()
        if fam not in best or abs(cost[i] - target) < abs(cost[best[fam]] - target):
            best[fam] = i
    errors = {}
    for fam, i in best.items():
        approx = derivation.block(cands.name, layer, [*cands.prefix, cands.specs[i - 1]])(x)
        errors[fam] = ((approx - y).pow(2).sum() / norm).item()
    return errors


def keep_families(cands: LayerCandidates, errors: dict[tuple, float], k: int) -> LayerCandidates:
    """Only the ``k`` families with the smallest errors (all when k <= 0)."""
    if k <= 0 or len(errors) <= k:
        return cands
    chosen = set(sorted(errors, key=errors.__getitem__)[:k])
    return cands.subset(lambda s: s.family() in chosen)
