"""Model surgery on any nn.Module: find target layers, trace their shapes, swap them by dotted name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from svdnas.decompose import conv_geometry, decompose, empty_block
from svdnas.errors import SpecError, describe
from svdnas.plan import Plan

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class LayerInfo:
    """A layer met in the traced forward pass.

    Attributes:
        name: dotted module name.
        input_hw: spatial size of its input ((positions, 1) for nn.Linear).
        output_hw: spatial size of its output.
        order: position in the forward pass.
    """

    name: str
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    order: int


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a weight layer cannot be decomposed, or None when it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} conv (groups={module.groups}) is not covered by the decomposition"
        try:
            conv_geometry(module)
        except SpecError as e:
            return str(e)
        return None
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"{type(module).__name__} is not covered by the decomposition (only Conv2d and Linear)"
    return None


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, nn.LazyConv2d)


def _pointwise(m: nn.Module, name: str) -> bool:
    return _is_plain_conv(m) and tuple(m.kernel_size) == (1, 1) and m.groups == 1  # type: ignore[union-attr]


def _convs(m: nn.Module, name: str) -> bool:
    return _is_plain_conv(m) and m.groups == 1  # type: ignore[union-attr]


def _linear(m: nn.Module, name: str) -> bool:
    return isinstance(m, nn.Linear)


PRESETS: dict[str, FilterFn] = {
    "all-but-first": _convs,  # the first conv in forward order is removed in select_targets
    "convs": _convs,
    "pointwise": _pointwise,
    "linear": _linear,
    "convs+linear": lambda m, n: _convs(m, n) or _linear(m, n),
}


def trace_layers(model: nn.Module, example: torch.Tensor) -> dict[str, LayerInfo]:
    """Shapes of every Conv/Linear layer from one forward pass, in forward order.

    A layer called several times keeps its first call's shapes.
    """
    infos: dict[str, LayerInfo] = {}
    handles = []

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in infos:
                return
            x = inputs[0]
            if isinstance(module, nn.Linear):
                positions = x.numel() // x.shape[-1] // x.shape[0] if x.dim() > 1 else 1
                ihw = ohw = (positions, 1)
            else:
                ihw = (x.shape[-2], x.shape[-1]) if x.dim() >= 3 else (1, 1)
                ohw = (output.shape[-2], output.shape[-1]) if output.dim() >= 3 else (1, 1)
            infos[name] = LayerInfo(name, ihw, ohw, len(infos))

        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        _forward(model, example)
    finally:
        for h in handles:
            h.remove()
    return infos


def _forward(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """One forward pass in eval mode without gradients; a model that cannot take ``example`` is a SpecError."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(example)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise SpecError(
            f"the model fails on an input of shape {tuple(example.shape[1:])} ({describe(e)}); "
            "give the right --input-shape C,H,W or data of that shape"
        ) from e
    finally:
        model.train(was_training)


def check_input(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Run the model once on zeros of ``input_shape`` (C, H, W), so that a wrong shape fails early and clearly.

    Raises:
        SpecError: naming the shape and what the model said.
    """
    _forward(model, example_input(model, input_shape))


def select_targets(
    model: nn.Module, infos: dict[str, LayerInfo], filter_fn: FilterFn | str = "all-but-first"
) -> tuple[list[str], dict[str, str]]:
    """Target layers (dotted names, forward order) and the layers left alone with a reason.

    Args:
        model: the model.
        infos: :func:`trace_layers` of it; layers never called in the forward pass are not targets.
        filter_fn: a ``(module, name) -> bool`` or the name of a preset in :data:`PRESETS`.
    """
    preset = filter_fn if isinstance(filter_fn, str) else None
    if preset is not None:
        if preset not in PRESETS:
            raise SpecError(f"unknown layer filter {preset!r}; choose one of {', '.join(PRESETS)}")
        filter_fn = PRESETS[preset]
    modules = dict(model.named_modules())
    ordered = sorted(infos.values(), key=lambda i: i.order)
    targets: list[str] = []
    skipped: dict[str, str] = {}
    first_conv = next((i.name for i in ordered if isinstance(modules[i.name], nn.Conv2d)), None)
    for info in ordered:
        m = modules[info.name]
        reason = unsupported_reason(m)
        if reason is not None:
            skipped[info.name] = reason
            continue
        if preset == "all-but-first" and info.name == first_conv:
            continue
        if filter_fn(m, info.name):  # type: ignore[operator]
            targets.append(info.name)
    return targets, skipped


def require_targets(
    model: nn.Module, infos: dict[str, LayerInfo], filter_fn: FilterFn | str = "all-but-first"
) -> tuple[list[str], dict[str, str]]:
    """:func:`select_targets`, refusing a model where nothing would be compressed.

    Raises:
        SpecError: no layer matches; the layers left alone as unsupported are named.
    """
    targets, skipped = select_targets(model, infos, filter_fn)
    if not targets:
        which = f" {filter_fn!r}" if isinstance(filter_fn, str) else ""
        alone = f"; left alone as not covered by the decomposition: {', '.join(skipped)}" if skipped else ""
        raise SpecError(f"no layer of the model matches the layer filter{which}: nothing to compress{alone}")
    return targets, skipped


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def apply_plan(model: nn.Module, plan: Plan, derive: bool = True) -> nn.Module:
    """Decompose, in place, every layer the plan compresses; returns the model.

    Args:
        derive: derive weights by SVD; False builds the structure only (to load saved weights into).
    """
    for name, specs in plan.compressed().items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as e:
            raise SpecError(f"the plan names layer {name!r}, which the model does not have") from e
        build = decompose if derive else empty_block
        try:
            set_submodule(model, name, build(layer, specs))
        except SpecError as e:
            raise SpecError(f"layer {name}: {e}") from e
    return model


def example_input(model: nn.Module, input_shape: Sequence[int], batch: int = 1) -> torch.Tensor:
    p = next(model.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    return torch.zeros(batch, *input_shape, **kw)
