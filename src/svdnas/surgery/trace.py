"""Model surgery on any nn.Module: find target layers, trace their shapes, swap them by dotted name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from svdnas.errors import SpecError, describe


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


def example_input(model: nn.Module, input_shape: Sequence[int], batch: int = 1) -> torch.Tensor:
    p = next(model.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    return torch.zeros(batch, *input_shape, **kw)
