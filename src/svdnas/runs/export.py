"""ONNX export of a (compressed) model, checked in ONNX Runtime against PyTorch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas.cost.onnx import DEFAULT_OPSET, OPSETS, onnx_bytes, require_onnx
from svdnas.errors import SpecError, SvdnasError, describe
from svdnas.fileio import atomic_write_bytes


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path, opset: int = DEFAULT_OPSET, check: int = 3, tolerance: float = 1e-4
) -> dict[str, Any]:
    """Write ``model`` as ONNX (dynamic batch) and compare ONNX Runtime with PyTorch on random inputs.

    Returns:
        {"path", "opset", "max_abs_diff", "inputs_checked"}.

    Raises:
        SvdnasError: if onnx/onnxruntime are missing, or the outputs differ by more than ``tolerance``.
    """
    if opset not in OPSETS:
        raise SpecError(f"the ONNX exporter writes opsets {OPSETS.start} to {OPSETS.stop - 1}; got {opset}")
    onnx, ort = require_onnx()
    x = torch.randn(1, *input_shape)
    try:
        data = onnx_bytes(model, x, opset)
        onnx.checker.check_model(onnx.load_from_string(data))
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as e:  # the exporter's and ONNX Runtime's own kinds: an opset either cannot do, an operator with no export
        raise SvdnasError(f"the ONNX export at opset {opset} failed: {describe(e)}") from e
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    reference = copy.deepcopy(model).eval().cpu()
    with torch.no_grad():
        for i in range(check):
            xb = torch.randn(2 + i, *input_shape, generator=g)
            ref = reference(xb).numpy()
            got = session.run(None, {"input": xb.numpy()})[0]
            worst = max(worst, float(abs(got - ref).max()))
    if worst > tolerance:
        raise SvdnasError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {tolerance:.0e}); the file was not written")
    atomic_write_bytes(path, data)
    return {"path": str(path), "opset": opset, "max_abs_diff": worst, "inputs_checked": check}
