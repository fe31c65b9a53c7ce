"""ONNX export of a (compressed) model, checked in ONNX Runtime against PyTorch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas.errors import SvdnasError
from svdnas.rundir import atomic_write_bytes

DEFAULT_OPSET = 17  # widely supported by ONNX Runtime releases


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SvdnasError("ONNX export needs onnx and onnxruntime: pip install 'svdnas[onnx]'") from e
    return onnx, onnxruntime


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path, opset: int = DEFAULT_OPSET, check: int = 3, tolerance: float = 1e-4
) -> dict[str, Any]:
    """Write ``model`` as ONNX (dynamic batch) and compare ONNX Runtime with PyTorch on random inputs.

    Returns:
        {"path", "opset", "max_abs_diff", "inputs_checked"}.

    Raises:
        SvdnasError: if onnx/onnxruntime are missing, or the outputs differ by more than ``tolerance``.
    """
    onnx, ort = _require_onnx()
    model = model.eval().cpu()
    x = torch.randn(1, *input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(check):
            xb = torch.randn(2 + i, *input_shape, generator=g)
            ref = model(xb).numpy()
            got = session.run(None, {"input": xb.numpy()})[0]
            worst = max(worst, float(abs(got - ref).max()))
    if worst > tolerance:
        raise SvdnasError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {tolerance:.0e}); the file was not written")
    atomic_write_bytes(path, data)
    return {"path": str(path), "opset": opset, "max_abs_diff": worst, "inputs_checked": check}
