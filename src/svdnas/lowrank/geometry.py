"""Geometry of the layers the LR-space covers: a Conv2d (groups=1), or a Linear as a 1x1 conv."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from svdnas.errors import SpecError
from svdnas.lowrank.spec import LowRankSpec


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

    def branch_params(self, spec: LowRankSpec) -> tuple[int, int]:
        """Weights of a branch's first and second layer (no bias)."""
        a = spec.first_kernel
        b = (self.kernel[0] // a[0], self.kernel[1] // a[1])
        return spec.width * (self.in_channels // spec.groups[0]) * a[0] * a[1], self.out_channels * (spec.width // spec.groups[1]) * b[0] * b[1]

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


def layer_geometry(layer: nn.Module) -> ConvGeometry:
    """Geometry of a target layer: a plain Conv2d's, or an ``nn.Linear``'s as that of a 1x1 conv.

    Raises:
        SpecError: for any other layer, or a conv :func:`conv_geometry` refuses.
    """
    if isinstance(layer, nn.Linear):
        return ConvGeometry(layer.out_features, layer.in_features, (1, 1), (1, 1), (0, 0), (1, 1), "zeros", layer.bias is not None)
    return conv_geometry(layer)
