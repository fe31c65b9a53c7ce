"""A plan's layers fitted in forward order on the inputs the already-compressed prefix gives them.

Each layer's factors are derived so that the low-rank block, fed the compressed model's inputs,
reproduces the *original* layer on the original model's inputs (the asymmetric fit of
:func:`~svdnas.lowrank.whiten.derive_prefix`), and its bias is shifted by the change of its output's
mean. Layer ``n`` is fitted once layers ``0..n-1`` are in place, so the errors of the earlier layers
are compensated instead of compounded.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdnas.errors import SpecError
from svdnas.hooks import forward_hooks
from svdnas.lowrank.calibration import CrossMoments, needed_families
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.whiten import derive_prefix
from svdnas.surgery.swap import set_submodule

log = logging.getLogger(__name__)


class _Reached(Exception):
    """Raised by a pre-hook to end a forward pass once the layer of interest has its input."""


@torch.no_grad()
def layer_inputs(model: nn.Module, name: str, batches: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """The input of layer ``name`` for each batch; each forward pass stops at that layer."""
    got: list[Tensor] = []

    def grab(_module, args):
        got.append(args[0].detach())
        raise _Reached

    with forward_hooks([(model.get_submodule(name), grab)], pre=True):
        for x in batches:
            before = len(got)
            try:
                model(x.to(device))
            except _Reached:
                pass
            if len(got) == before:
                raise SpecError(f"layer {name} was not called in a forward pass; it cannot be fitted on its inputs")
    return got


def _relative_error(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    num = sum(float((o.double() - r.double()).pow(2).sum()) for r, o in zip(reference, outputs))
    den = sum(float(r.double().pow(2).sum()) for r in reference)
    return num / den if den > 0 else 0.0


@dataclass
class PrefixFit:
    """The fitted model and, per layer, the relative output error (against the original layer on the
    original inputs) of the job's own factors and of the prefix-fitted ones, both on the compressed
    prefix's inputs."""

    model: nn.Module
    errors: dict[str, dict[str, float]]
    images: int


@torch.no_grad()
def fit_on_prefix(
    original: nn.Module,
    plan: Plan,
    order: Sequence[str],
    batches: Sequence[Tensor],
    device: torch.device | str,
    derivation: Derivation | None = None,
    *,
    bias_correction: bool = True,
    refit_iters: int = 0,
    damping: float = 1e-6,
    progress: Callable[[int, int], None] | None = None,
) -> PrefixFit:
    """``original`` (untouched) compressed by ``plan``, each layer fitted on the compressed prefix.

    Args:
        order: the plan's layers in forward order (a layer is fitted once those before it are in place).
        batches: calibration images, the same for both models.
        derivation: the factors the errors are compared against (the search's); None: the weight's SVD.
        bias_correction: shift each block's bias by the change of its output's mean (a layer with no
            bias gets one).
        refit_iters: alternating least-squares steps on the exact error for the families whose
            second layer holds kernel dimensions or whose first is grouped (0: the pooled fit only).
    """
    derivation = derivation or Derivation()
    was_training = original.training
    original.eval()
    compressed = copy.deepcopy(original)
    layers = [n for n in order if plan.layers.get(n)]
    errors: dict[str, dict[str, float]] = {}
    try:
        for i, name in enumerate(layers):
            specs = plan.layers[name]
            layer = original.get_submodule(name)
            x_orig = layer_inputs(original, name, batches, device)
            x_comp = layer_inputs(compressed, name, batches, device)
            stats = CrossMoments(layer, needed_families(specs), full=refit_iters > 0)
            for xo, xc in zip(x_orig, x_comp):
                stats.update(xo, xc)
            try:
                fitted = derive_prefix(layer, specs, stats, damping=damping, bias_correction=bias_correction, refit_iters=refit_iters)
            except SpecError as e:
                raise SpecError(f"layer {name}: {e}") from e
            fitted = fitted.to(dtype=layer.weight.dtype).eval()
            own = derivation.block(name, layer, specs).eval()
            reference = [layer(x) for x in x_orig]
            errors[name] = {
                "derived": _relative_error(reference, [own(x) for x in x_comp]),
                "fitted": _relative_error(reference, [fitted(x) for x in x_comp]),
            }
            log.debug("%s: relative output error %.4g -> %.4g", name, errors[name]["derived"], errors[name]["fitted"])
            set_submodule(compressed, name, fitted)
            if progress is not None:
                progress(i + 1, len(layers))
    finally:
        original.train(was_training)
    return PrefixFit(compressed, errors, sum(len(x) for x in batches))


__all__ = ["PrefixFit", "fit_on_prefix", "layer_inputs"]
