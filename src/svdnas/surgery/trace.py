"""Model surgery on any nn.Module: find target layers, trace their shapes, swap them by dotted name."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from svdnas.errors import SpecError, describe
from svdnas.hooks import evaluation_mode, forward_hooks


@dataclass(frozen=True)
class LayerInfo:
    """A layer met in the traced forward pass.

    Attributes:
        name: dotted module name.
        input_hw: spatial size of its input ((positions, 1) for nn.Linear).
        output_hw: spatial size of its output.
        order: position in the forward pass.
        calls: how many times the forward pass called it (more than 1: weights shared between calls).
    """

    name: str
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    order: int
    calls: int = 1


def trace_layers(model: nn.Module, example: torch.Tensor) -> dict[str, LayerInfo]:
    """Shapes of every Conv/Linear layer from one forward pass, in forward order.

    A layer called several times keeps its first call's shapes and counts its calls.
    """
    infos: dict[str, LayerInfo] = {}

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in infos:
                infos[name] = replace(infos[name], calls=infos[name].calls + 1)
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

    weighted = ((m, hook(name)) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))
    with forward_hooks(weighted):
        _forward(model, example)
    return infos


# words of PyTorch's messages when a tensor's shape does not fit a layer or an op (conv, linear, view, cat, ...)
_SHAPE_WORDS = ("shape", "size", "dimension", "channels", "expected input", "mat1", "mat2", "input[")
_TORCH_DIR = Path(torch.__file__).parent


def _raised_at(e: BaseException) -> str:
    """``file:line`` of the deepest frame outside PyTorch where ``e`` was raised (the user's code)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not Path(f.filename).is_relative_to(_TORCH_DIR)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "inside PyTorch"


def _forward(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """One forward pass in eval mode without gradients.

    Raises:
        SpecError: the model cannot take ``example`` (PyTorch says a shape does not fit: the input
            shape is the likely cause); or the model's own code failed otherwise, named with where it
            raised, so that a bug in the model is not mistaken for a wrong input shape.
    """
    try:
        with evaluation_mode(model), torch.no_grad():
            return model(example)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as e:
        if not any(w in str(e).lower() for w in _SHAPE_WORDS):
            raise _model_bug(e, example) from e
        raise SpecError(
            f"the model fails on an input of shape {tuple(example.shape[1:])} ({describe(e)}); "
            "give the right --input-shape C,H,W or data of that shape"
        ) from e
    except Exception as e:
        raise _model_bug(e, example) from e


def _model_bug(e: BaseException, example: torch.Tensor) -> SpecError:
    return SpecError(
        f"the model's forward raised {describe(e)} at {_raised_at(e)} on an input of shape {tuple(example.shape[1:])}; "
        "this is an error in the model's code, not of its input shape"
    )


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
