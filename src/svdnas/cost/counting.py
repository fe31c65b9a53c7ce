"""Cost of layers and models: MACs and parameters with thop's convention (FLOPs = 2 x MACs).

Per layer, :func:`layer_cost` counts what :func:`svdnas.decompose` builds from formulas; whole
models are counted by ultralytics-thop, and the tests hold the two to agreement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from svdnas.lowrank.decompose import check_layer_specs
from svdnas.lowrank.geometry import ConvGeometry
from svdnas.lowrank.spec import LowRankSpec


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_out_hw(hw: tuple[int, int], kw: dict) -> tuple[int, int]:
    k, s, p, d = kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"]
    return _out(hw[0], k[0], s[0], p[0], d[0]), _out(hw[1], k[1], s[1], p[1], d[1])


def _dense_conv_cost(conv: nn.Conv2d, input_hw: tuple[int, int]) -> tuple[int, int]:
    """(MACs, params) of any Conv2d, grouped and depthwise included."""
    if conv.padding == "same":
        ho, wo = input_hw  # PyTorch allows 'same' only with stride 1
    else:
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
        ho, wo = (_out(input_hw[i], k[i], s[i], padding[i], d[i]) for i in range(2))  # type: ignore[index]
    per_out = conv.weight[0].numel()
    params = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    return ho * wo * conv.out_channels * per_out, params


def branch_cost(geo: ConvGeometry, input_hw: tuple[int, int], spec: LowRankSpec, bias: bool) -> tuple[int, int]:
    """(MACs, params) of one branch; ``bias`` says whether this branch carries the layer's bias."""
    kw1, kw2 = geo.split(spec)
    hw1 = _conv_out_hw(input_hw, kw1)
    hw2 = _conv_out_hw(hw1, kw2)
    p1, p2 = geo.branch_params(spec)
    macs = hw1[0] * hw1[1] * p1 + hw2[0] * hw2[1] * p2
    return macs, p1 + p2 + (geo.out_channels if bias else 0)


def layer_cost(conv: nn.Module, input_hw: tuple[int, int], specs: Sequence[LowRankSpec] = ()) -> tuple[int, int]:
    """Exact (MACs, params) of ``conv``, or of what ``decompose(conv, specs)`` builds.

    Args:
        conv: an ``nn.Conv2d`` or ``nn.Linear``.
        input_hw: spatial size of the input; for ``nn.Linear`` the number of positions it is
            applied at, as (positions, 1).
        specs: branches; empty for the original layer.

    Returns:
        MACs for one input (batch 1, thop's convention: bias adds are not counted) and params.
    """
    if not specs:
        if isinstance(conv, nn.Linear):
            params = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
            return input_hw[0] * input_hw[1] * conv.weight.numel(), params
        return _dense_conv_cost(conv, input_hw)
    geo = check_layer_specs(conv, specs)
    macs = params = 0
    for n, spec in enumerate(specs):
        m, p = branch_cost(geo, input_hw, spec, bias=geo.bias and n == 0)
        macs, params = macs + m, params + p
    return macs, params


def model_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Whole-model MACs for one input of ``input_shape`` (C, H, W), counted by thop."""
    from thop import profile

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    macs, _ = profile(model, inputs=(x,), verbose=False)
    return round(macs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rank_cost(layer: nn.Module, input_hw: tuple[int, int], family: LowRankSpec, objective: str = "flops") -> tuple[float, float]:
    """(cost at rank 0, cost of each further rank) of one branch of ``family``'s kind.

    Both MACs and params are affine in the rank (the bias is the only fixed part), so a layer's
    cost at any rank follows from these two numbers.

    Args:
        family: any member of the family (its rank is ignored).
        objective: ``"flops"`` for MACs, ``"params"`` for parameters.
    """
    macs, params = layer_cost(layer, input_hw, [family.with_rank(1)])
    if objective == "params":
        base = float(layer.bias.numel()) if getattr(layer, "bias", None) is not None else 0.0
        return base, params - base
    return 0.0, float(macs)
