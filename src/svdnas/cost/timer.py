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


def spread(times: list[float]) -> dict[str, float]:
    """The median and the 10th and 90th percentiles of ``times`` (ms), the percentiles interpolated
    between measured times, never beyond the fastest or the slowest."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1]}


def measure(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs; milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return spread(times) | {"min_ms": min(times), "repeats": repeats}


@contextmanager
def timing_threads(threads: int | None) -> Iterator[None]:
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
    with timing_threads(threads):
        return measure(latency_runner(model, input_shape, "torch", batch, torch.device(device), threads), **kw)


def onnx_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, threads: int | None = None, **kw: Any) -> dict[str, float]:
    """Latency of ``model`` exported to ONNX and run by ONNX Runtime on the CPU (``model`` itself is not moved)."""
    return measure(latency_runner(model, input_shape, "onnxruntime", batch, torch.device("cpu"), threads), **kw)


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


def latency_runner(model: nn.Module, input_shape: tuple[int, ...], runtime: str, batch: int, device: torch.device,
                   threads: int | None, stop_spinning: bool = False) -> Callable[[], object]:
    """One inference of ``model`` (a copy, or its ONNX graph) in ``runtime``, ready to time.

    ``stop_spinning``: ONNX Runtime's worker threads stop spinning when a run ends (they still spin
    between the operators of a run), so that a session left waiting does not take the cores of the
    one being timed."""
    if runtime == "onnxruntime":
        _, ort = require_onnx()
        x = torch.randn(batch, *input_shape)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if stop_spinning:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(onnx_bytes(model, x, dynamic_batch=False), opts, providers=providers)
        feed = {"input": x.numpy()}
        return lambda: session.run(None, feed)
    # in the default memory format, as a user holds a model (a job's working copy may be channels-last)
    copied = copy.deepcopy(model).eval().to(device).to(memory_format=torch.contiguous_format)
    x = torch.randn(batch, *input_shape, device=device)

    def run() -> None:  # timed inside timing_threads, in inference mode
        copied(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def compare_latency(
    original: nn.Module, compressed: nn.Module, input_shape: tuple[int, ...], runtime: str, *, batch: int = 1,
    threads: int | None = None, device: torch.device | str = "cpu", rounds: int = 31, repeats: int | None = None,
    warmup: int = 2, block_ms: float = 20.0, max_seconds: float = 30.0,
) -> dict[str, float]:
    """Both models' latency in ``runtime``, timed in interleaved rounds (so that load on a shared
    machine hits both alike). Neither model is moved or modified.

    Each round times the original, then the compressed model, ``repeats`` runs each (None: as many
    as take about ``block_ms``, 5 to 50; rounds cut, to 5 at least, so that the whole comparison takes
    about ``max_seconds`` when the models are slow); the reduction is the median over rounds of each round's own
    reduction, which a slow spell of the machine shifts far less than a ratio of overall medians.
    On this project's 2-core machine at two threads, the reduction of one plan read again in fresh
    sessions varied by a standard deviation of 0.06 with 7 rounds and 0.026 with 35 (PyTorch: 0.086,
    0.008).
    ONNX Runtime's sessions stop their threads spinning after each run: two sessions in one process
    would otherwise take each other's cores (on a 2-core machine, the original read 1.5 or 5 ms at
    random; ``benchmarks/diagnostics/timing_stability.py``).

    Returns:
        ``original_ms`` and ``compressed_ms`` (medians of the rounds' medians), ``reduction``
        (1 - compressed / original, the median of the rounds') and ``spread`` (the rounds'
        reductions, largest minus smallest).
    """
    if runtime not in RUNTIMES:
        raise SvdnasError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    device = torch.device(device)
    with timing_threads(threads):
        runs = [latency_runner(m, input_shape, runtime, batch, device, threads, stop_spinning=True) for m in (original, compressed)]
        first = measure(runs[0], warmup=warmup, repeats=3)["median_ms"]
        if repeats is None:
            repeats = int(min(50, max(5, block_ms // max(first, 1e-3))))
        per_round_s = 2 * (warmup + repeats) * first / 1000  # the compressed model is taken as fast as the original
        rounds = max(min(rounds, 5), min(rounds, int(max_seconds / max(per_round_s, 1e-9))))
        medians: list[list[float]] = [[], []]
        for _ in range(rounds):
            for k, fn in enumerate(runs):
                medians[k].append(measure(fn, warmup=warmup, repeats=repeats)["median_ms"])
    ratios = [1 - after / before for before, after in zip(*medians, strict=True)]
    return {"original_ms": statistics.median(medians[0]), "compressed_ms": statistics.median(medians[1]),
            "reduction": statistics.median(ratios), "spread": max(ratios) - min(ratios)}


def channel_block(device: torch.device | str = "cpu") -> int:
    """The channel block in which ONNX Runtime's CPU kernels (MLAS, NCHWc layout) compute on this
    machine: 16 with AVX-512, 8 with AVX2; 1 (no rounding asked) on other CPUs and on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 1)
