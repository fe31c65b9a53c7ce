"""Measured inference latency: warm-up, repeated runs, median and spread; PyTorch and ONNX Runtime."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from svdnas.cost.onnx import onnx_bytes, require_onnx
from svdnas.errors import SvdnasError


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


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: left as they are) for the block, then restored;
    inference mode inside it."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(old)


def torch_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, threads: int | None = None,
    device: torch.device | str = "cpu", **kw: Any,
) -> dict[str, float]:
    """Latency of ``model`` on ``device`` (a copy runs there: ``model`` is not moved); on CUDA each run waits for the GPU."""
    with _threads(threads):
        return measure(_runner(model, input_shape, "torch", batch, torch.device(device), threads), **kw)


def onnx_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, threads: int | None = None, **kw: Any) -> dict[str, float]:
    """Latency of ``model`` exported to ONNX and run by ONNX Runtime on the CPU (``model`` itself is not moved)."""
    return measure(_runner(model, input_shape, "onnxruntime", batch, torch.device("cpu"), threads), **kw)


RUNTIMES = ("onnxruntime", "torch")


def onnxruntime_available() -> bool:
    try:
        require_onnx()
    except SvdnasError:
        return False
    return True


def default_runtime() -> str:
    """Where latency is measured unless told: ONNX Runtime when installed (what models are deployed
    with), PyTorch eager otherwise."""
    return "onnxruntime" if onnxruntime_available() else "torch"


def _runner(model: nn.Module, input_shape: tuple[int, ...], runtime: str, batch: int, device: torch.device,
            threads: int | None) -> Callable[[], object]:
    """One inference of ``model`` (a copy, or its ONNX graph) in ``runtime``, ready to time."""
    if runtime == "onnxruntime":
        _, ort = require_onnx()
        x = torch.randn(batch, *input_shape)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(onnx_bytes(model, x, dynamic_batch=False), opts, providers=providers)
        feed = {"input": x.numpy()}
        return lambda: session.run(None, feed)
    # in the default memory format, as a user holds a model (a job's working copy may be channels-last)
    copied = copy.deepcopy(model).eval().to(device).to(memory_format=torch.contiguous_format)
    x = torch.randn(batch, *input_shape, device=device)

    def run() -> None:  # timed inside _threads, in inference mode
        copied(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def compare_latency(
    original: nn.Module, compressed: nn.Module, input_shape: tuple[int, ...], runtime: str, *, batch: int = 1,
    threads: int | None = None, device: torch.device | str = "cpu", rounds: int = 3, repeats: int = 10, warmup: int = 3,
) -> dict[str, float]:
    """Both models' latency in ``runtime``, timed in interleaved rounds (so that load on a shared
    machine hits both alike); the middle of the rounds' medians. Neither model is moved or modified.

    Returns:
        ``original_ms``, ``compressed_ms`` and ``reduction`` (1 - compressed / original).
    """
    if runtime not in RUNTIMES:
        raise SvdnasError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    device = torch.device(device)
    with _threads(threads):
        runs = [_runner(m, input_shape, runtime, batch, device, threads) for m in (original, compressed)]
        medians: list[list[float]] = [[], []]
        for _ in range(rounds):
            for k, fn in enumerate(runs):
                medians[k].append(measure(fn, warmup=warmup, repeats=repeats)["median_ms"])
    before, after = (sorted(m)[len(m) // 2] for m in medians)
    return {"original_ms": before, "compressed_ms": after, "reduction": 1 - after / before}
