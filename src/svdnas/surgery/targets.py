"""Which layers of a model to compress: presets and filters, by dotted module name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from svdnas.errors import SpecError
from svdnas.lowrank.geometry import conv_geometry
from svdnas.surgery.trace import LayerInfo

FilterFn = Callable[[nn.Module, str], bool]


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


def _all_but_first(m: nn.Module, name: str) -> bool:
    return _convs(m, name)


_all_but_first.skips_first_conv = True  # type: ignore[attr-defined]  # select_targets leaves the first conv called alone


PRESETS: dict[str, FilterFn] = {
    "all-but-first": _all_but_first,
    "convs": _convs,
    "pointwise": _pointwise,
    "linear": _linear,
    "convs+linear": lambda m, n: _convs(m, n) or _linear(m, n),
}


def select_targets(
    model: nn.Module, infos: dict[str, LayerInfo], filter_fn: FilterFn | str = "all-but-first"
) -> tuple[list[str], dict[str, str]]:
    """Target layers (dotted names, forward order) and the layers left alone with a reason.

    Args:
        model: the model.
        infos: :func:`trace_layers` of it; layers never called in the forward pass are not targets.
        filter_fn: a ``(module, name) -> bool`` or the name of a preset in :data:`PRESETS` (the
            preset's function itself works the same as its name).

    A layer called more than once in the forward pass (its weights shared between calls) is left
    alone: its low-rank version would run at every call, and the plan's cost could not be that of one layer.
    """
    if isinstance(filter_fn, str):
        if filter_fn not in PRESETS:
            raise SpecError(f"unknown layer filter {filter_fn!r}; choose one of {', '.join(PRESETS)}")
        filter_fn = PRESETS[filter_fn]
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
        if info.calls > 1:
            skipped[info.name] = f"called {info.calls} times in one forward pass (shared weights); not a target"
            continue
        if getattr(filter_fn, "skips_first_conv", False) and info.name == first_conv:
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
