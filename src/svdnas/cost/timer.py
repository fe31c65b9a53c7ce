"""Measured inference latency: warm-up, repeated runs, median and spread; PyTorch and ONNX Runtime."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from svdnas.cost.onnx import onnx_bytes, require_onnx


def measure(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs; milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(times), "repeats": repeats}


def torch_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, threads: int | None = None,
    device: torch.device | str = "cpu", **kw: Any,
) -> dict[str, float]:
    """Latency of ``model`` on ``device`` (a copy runs there: ``model`` is not moved); on CUDA each run waits for the GPU."""
    device = torch.device(device)
    model = copy.deepcopy(model).eval().to(device)
    x = torch.randn(batch, *input_shape, device=device)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    def run() -> None:
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with torch.inference_mode():
            return measure(run, **kw)
    finally:
        torch.set_num_threads(old)


def onnx_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, threads: int | None = None, **kw: Any) -> dict[str, float]:
    """Latency of ``model`` exported to ONNX and run by ONNX Runtime on the CPU (``model`` itself is not moved)."""
    _, ort = require_onnx()
    x = torch.randn(batch, *input_shape)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes(model, x, dynamic_batch=False), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return measure(lambda: session.run(None, feed), **kw)
