"""Swapping layers by dotted name: a plan applied to a model."""

from __future__ import annotations

import torch
from torch import nn

from svdnas.errors import SpecError
from svdnas.lowrank.decompose import empty_block
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.modules import LowRankBlock
from svdnas.lowrank.plan import Plan


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def apply_plan(model: nn.Module, plan: Plan, derive: bool = True, derivation: Derivation | None = None) -> nn.Module:
    """Decompose, in place, every layer the plan compresses; returns the model.

    Args:
        derive: derive the factors; False builds the structure only (to load saved weights into).
        derivation: how the factors are derived (None: the paper's SVD of the weight).
    """
    derivation = derivation or Derivation()
    for name, specs in plan.compressed().items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as e:
            raise SpecError(f"the plan names layer {name!r}, which the model does not have") from e
        try:
            set_submodule(model, name, derivation.block(name, layer, specs) if derive else empty_block(layer, specs))
        except SpecError as e:
            raise SpecError(f"layer {name}: {e}") from e
    return model


def add_saved_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each low-rank block the bias that ``state`` holds for it where the original layer had none
    (a bias correction put the shift of the output's mean there)."""
    for name, module in model.named_modules():
        if not isinstance(module, LowRankBlock):
            continue
        second = module.branches[0].second
        key = f"{name}.branches.0.second.bias" if name else "branches.0.second.bias"
        if second.bias is None and key in state:
            second.bias = nn.Parameter(torch.zeros(second.weight.shape[0], device=second.weight.device, dtype=second.weight.dtype))
