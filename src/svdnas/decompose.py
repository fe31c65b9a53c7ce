"""Data-free derivation: a pre-trained conv or linear layer -> a LowRankBlock of SVD branches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from svdnas import functional as F
from svdnas.errors import SpecError
from svdnas.modules import LowRankBlock, LowRankBranch
from svdnas.spec import LowRankSpec, check_spec


@dataclass(frozen=True)
class ConvGeometry:
    """What a decomposition needs to know of a conv, with padding resolved to numbers."""

    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    padding_mode: str
    bias: bool

    def split(self, spec: LowRankSpec) -> tuple[dict, dict]:
        """Conv keyword arguments of the first and the second layer of a branch.

        A dimension's stride, padding and dilation go to the layer holding its kernel; a
        dimension of kernel 1 counts as held by the first layer (striding early is cheaper).
        """
        a = spec.first_kernel
        first: dict = {"kernel_size": a, "stride": [], "padding": [], "dilation": []}
        second: dict = {"kernel_size": (self.kernel[0] // a[0], self.kernel[1] // a[1]), "stride": [], "padding": [], "dilation": []}
        for d in range(2):
            held, other = (first, second) if a[d] == self.kernel[d] else (second, first)
            held["stride"].append(self.stride[d])
            held["padding"].append(self.padding[d])
            held["dilation"].append(self.dilation[d])
            other["stride"].append(1)
            other["padding"].append(0)
            other["dilation"].append(1)
        for kw in (first, second):
            for k in ("stride", "padding", "dilation"):
                kw[k] = tuple(kw[k])
            kw["padding_mode"] = self.padding_mode
        first["groups"], second["groups"] = spec.groups
        return first, second


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """Geometry of a plain (groups=1) Conv2d.

    Raises:
        SpecError: for grouped or depthwise convs, or 'same' padding that is not symmetric.
    """
    if not isinstance(conv, nn.Conv2d):
        raise SpecError(f"expected nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        raise SpecError(f"{kind} conv (groups={conv.groups}) is not covered by the decomposition")
    kernel = tuple(conv.kernel_size)
    dilation = tuple(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            padding = (0, 0)
        else:  # 'same'
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            if any(t % 2 for t in totals):
                raise SpecError("padding='same' with an even kernel pads unevenly; not covered by the decomposition")
            padding = tuple(t // 2 for t in totals)
    else:
        padding = tuple(conv.padding)
    return ConvGeometry(
        conv.out_channels, conv.in_channels, kernel, tuple(conv.stride), padding, dilation,  # type: ignore[arg-type]
        conv.padding_mode, conv.bias is not None,
    )


def conv_weight(layer: nn.Module) -> torch.Tensor:
    """A conv's weight (O, I, kh, kw), or a linear layer's as that of a 1x1 conv."""
    return layer.weight[:, :, None, None] if isinstance(layer, nn.Linear) else layer.weight


def _linear_as_geometry(linear: nn.Linear) -> ConvGeometry:
    return ConvGeometry(linear.out_features, linear.in_features, (1, 1), (1, 1), (0, 0), (1, 1), "zeros", linear.bias is not None)


def check_layer_specs(layer: nn.Module, specs: Sequence[LowRankSpec]) -> ConvGeometry:
    if not specs:
        raise SpecError("decompose needs at least one LowRankSpec")
    if isinstance(layer, nn.Linear):
        geo = _linear_as_geometry(layer)
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
def decompose(layer: nn.Module, specs: Sequence[LowRankSpec] | LowRankSpec) -> LowRankBlock:
    """Replace-ready low-rank version of ``layer`` derived from its weight alone.

    Each spec makes a branch; branch n approximates the residual ``W - sum of branches before n``
    by the truncated SVD of its family's unfolding. The bias goes to the first branch's second
    layer. At full rank the block reproduces the layer to float precision.

    Args:
        layer: an ``nn.Conv2d`` with groups=1 (any kernel, stride, padding, dilation) or an ``nn.Linear``.
        specs: one spec per branch.

    Raises:
        SpecError: if a spec does not fit the layer, naming the rule broken.
    """
    specs = [specs] if isinstance(specs, LowRankSpec) else list(specs)
    block = empty_block(layer, specs)
    weight = conv_weight(layer)
    kernel = (weight.shape[2], weight.shape[3])
    residual = weight.detach().clone()
    for n, (branch, spec) in enumerate(zip(block.branches, specs)):
        factors = F.svd(residual, spec.first_kernel, spec.groups)
        w1, w2 = F.factor_weights(factors, spec, kernel)
        branch.first.weight.copy_(w1.reshape(branch.first.weight.shape))
        branch.second.weight.copy_(w2.reshape(branch.second.weight.shape))
        if n + 1 < len(specs):
            residual -= F.reconstruct(factors, spec.rank, residual.shape, spec.family())
    if layer.bias is not None:
        block.branches[0].second.bias.copy_(layer.bias)
    return block
