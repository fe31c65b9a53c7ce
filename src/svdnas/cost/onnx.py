"""A model as an ONNX graph in memory: what the latency timer runs and what ``svdnas export`` writes."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import torch
from torch import nn

from svdnas.errors import SvdnasError

DEFAULT_OPSET = 17  # widely supported by ONNX Runtime releases


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or an error that says how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SvdnasError("ONNX export and latency need onnx and onnxruntime: pip install 'svdnas[onnx]'") from e
    return onnx, onnxruntime


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> bytes:
    """The serialised ONNX graph of ``model`` in eval mode on the CPU; ``model`` itself is not moved or switched."""
    copied = copy.deepcopy(model).eval().cpu()
    buf = io.BytesIO()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            copied, (example.cpu(),), buf, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes=axes,
        )
    return buf.getvalue()
