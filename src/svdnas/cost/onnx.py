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
OPSETS = range(7, 21)  # what torch.onnx's TorchScript exporter (the one used here) can write


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


def optimized_ops(model: nn.Module, example: torch.Tensor, *, extended_only: bool = False, dynamic_batch: bool = False) -> dict[str, int]:
    """How many nodes of each op type ONNX Runtime's CPU provider runs for ``model`` on ``example``:
    the exported graph after the session's graph optimisations, all of them (the blocked NCHWc
    layout's ``Reorder*`` nodes included) or, with ``extended_only``, those up to
    ``ORT_ENABLE_EXTENDED`` (fusions, no layout of this machine's)."""
    import tempfile
    from pathlib import Path

    onnx, ort = require_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        opts = ort.SessionOptions()
        opts.optimized_model_filepath, opts.log_severity_level = path, 3
        if extended_only:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(onnx_bytes(model, example, dynamic_batch=dynamic_batch), opts, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(path).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def reorder_nodes(model: nn.Module, example: torch.Tensor) -> int:
    """The ``Reorder*`` nodes ONNX Runtime adds to ``model``'s graph on this CPU: each moves a tensor
    into or out of its blocked channel layout."""
    return sum(n for op, n in optimized_ops(model, example).items() if op.startswith("Reorder"))
