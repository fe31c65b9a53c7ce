"""Data-free derivation: a pre-trained conv or linear layer -> a LowRankBlock of SVD branches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from svdnas.errors import SpecError
from svdnas.lowrank import functional as F
from svdnas.lowrank.geometry import ConvGeometry, conv_geometry, conv_weight, layer_geometry
from svdnas.lowrank.modules import LowRankBlock, LowRankBranch
from svdnas.lowrank.spec import LowRankSpec, check_spec


def check_layer_specs(layer: nn.Module, specs: Sequence[LowRankSpec]) -> ConvGeometry:
    if not specs:
        raise SpecError("decompose needs at least one LowRankSpec")
    if isinstance(layer, nn.Linear):
        geo = layer_geometry(layer)
        for s in specs:
            if s.num_groups > 1:
                raise SpecError(f"nn.Linear has no groups; got groups={s.groups}")
    elif isinstance(layer, nn.Conv2d):
        geo = conv_geometry(layer)
    else:
        raise SpecError(f"cannot decompose {type(layer).__name__}: only nn.Conv2d (groups=1) and nn.Linear")
    for s in specs:
        check_spec(s, geo.out_channels, geo.in_channels, geo.kernel)
    return geo


def empty_block(layer: nn.Module, specs: Sequence[LowRankSpec]) -> LowRankBlock:
    """The module ``decompose`` would build, with uninitialised weights (for loading saved models)."""
    geo = check_layer_specs(layer, specs)
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    branches = []
    for n, spec in enumerate(specs):
        bias = geo.bias and n == 0
        if isinstance(layer, nn.Linear):
            first: nn.Module = nn.Linear(geo.in_channels, spec.rank, bias=False, **factory)
            second: nn.Module = nn.Linear(spec.rank, geo.out_channels, bias=bias, **factory)
        else:
            kw1, kw2 = geo.split(spec)
            first = nn.Conv2d(geo.in_channels, spec.width, bias=False, **kw1, **factory)
            second = nn.Conv2d(spec.width, geo.out_channels, bias=bias, **kw2, **factory)
        branches.append(LowRankBranch(first, second, spec))
    block = LowRankBlock(branches)
    block.train(layer.training)
    return block


@torch.no_grad()
def decompose(conv: nn.Module, specs: Sequence[LowRankSpec] | LowRankSpec) -> LowRankBlock:
    """Replace-ready low-rank version of ``conv`` derived from its weight alone.

    Each spec makes a branch; branch n approximates the residual ``W - sum of branches before n``
    by the truncated SVD of its family's unfolding. The bias goes to the first branch's second
    layer. At full rank the block reproduces the conv to float precision.

    Args:
        conv: an ``nn.Conv2d`` with groups=1 (any kernel, stride, padding, dilation) or an ``nn.Linear``.
        specs: one spec per branch.

    Raises:
        SpecError: if a spec does not fit the conv, naming the rule broken.
    """
    specs = [specs] if isinstance(specs, LowRankSpec) else list(specs)
    block = empty_block(conv, specs)
    weight = conv_weight(conv)
    kernel = (weight.shape[2], weight.shape[3])
    residual = weight.detach().clone()
    for n, (branch, spec) in enumerate(zip(block.branches, specs)):
        factors = F.svd(residual, spec.first_kernel, spec.groups)
        w1, w2 = F.factor_weights(factors, spec, kernel)
        branch.first.weight.copy_(w1.reshape(branch.first.weight.shape))
        branch.second.weight.copy_(w2.reshape(branch.second.weight.shape))
        if n + 1 < len(specs):
            residual -= F.reconstruct(factors, spec.rank, residual.shape, spec.family())
    if conv.bias is not None:
        block.branches[0].second.bias.copy_(conv.bias)
    return block
