"""The report of a compressed model, shared by compress and the baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from svdnas.cost.counting import count_params, layer_cost, model_macs
from svdnas.cost.timer import compare_latency, default_runtime, onnxruntime_available
from svdnas.data.datasets import DataBundle
from svdnas.data.evaluate import evaluate, evaluate_cached
from svdnas.lowrank.plan import Plan
from svdnas.surgery.trace import LayerInfo


def accuracy_block(before: dict[str, float], after: dict[str, float], key: str) -> dict[str, float]:
    return {"original": before[key], "compressed": after[key], "drop_pp": before[key] - after[key]}


def build_report(
    original: nn.Module,
    compressed: nn.Module,
    plan: Plan,
    infos: dict[str, LayerInfo],
    shape: tuple[int, ...],
    data: DataBundle | None,
    device: torch.device | str,
    header: dict[str, Any],
    latency: bool = True,
    reference: dict[str, float] | None = None,
    latency_batch: int = 1,
    latency_threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Costs, accuracies (whole test split), measured latency and the per-layer plan; ``header`` goes first.

    Args:
        reference: the original model's accuracy on ``data.test`` if already measured.
        latency_batch: images per forward pass of the latency measurement (1: one request).
        latency_threads: CPU threads of the latency measurement (None: the current setting).
        runtime: the runtime whose figures lead the latency block (None: ONNX Runtime when installed);
            PyTorch eager and, when installed, ONNX Runtime are both measured.
        progress: called with ("evaluate", images done, images in all).
    """
    macs0, macs1 = model_macs(original, shape), model_macs(compressed, shape)
    params0, params1 = count_params(original), count_params(compressed)
    report: dict[str, Any] = dict(header)
    report["flops"] = {"original": 2 * macs0, "compressed": 2 * macs1, "reduction": 1 - macs1 / macs0}
    report["params"] = {"original": params0, "compressed": params1, "reduction": 1 - params1 / params0}
    if data is not None:
        n = len(data.test)  # type: ignore[arg-type]
        runs = 1 if reference else 2
        done = [0]

        def step(k: int) -> None:
            done[0] += k
            if progress is not None:
                progress("evaluate", done[0], runs * n)

        if reference:
            acc0, source = reference, "given"
        else:  # the original's accuracy is measured once per model, data and device, then remembered
            acc0, cached = evaluate_cached(original, data.test, device, progress=step)
            source = "cache" if cached else "measured"
            if cached:
                step(n)
        acc1 = evaluate(compressed, data.test, device, progress=step)
        report["top1"] = accuracy_block(acc0, acc1, "top1")
        report["top5"] = accuracy_block(acc0, acc1, "top5")
        report["original_accuracy"] = source
    else:
        report["top1"] = report["top5"] = None
    if latency:
        report["latency"] = latency_block(original, compressed, shape, device, latency_batch, latency_threads, runtime)
    layers = []
    for name, specs in plan.layers.items():
        layer = original.get_submodule(name)
        hw = infos[name].input_hw
        before = layer_cost(layer, hw)
        after = layer_cost(layer, hw, specs) if specs else before
        layers.append({
            "name": name, "input_hw": list(hw), "weight_shape": list(layer.weight.shape),
            "branches": [s.to_dict() for s in specs], "flops": [2 * before[0], 2 * after[0]], "params": [before[1], after[1]],
        })
    report["layers"] = layers
    return report


def latency_block(
    original: nn.Module, compressed: nn.Module, shape: tuple[int, ...], device: torch.device | str, batch: int = 1,
    threads: int | None = None, runtime: str | None = None,
) -> dict[str, Any]:
    """Both models' latency in PyTorch eager and, when installed, ONNX Runtime (interleaved rounds);
    the block's top-level figures are ``runtime``'s, ``runtimes`` has each one measured."""
    runtime = runtime or default_runtime()
    measured = ["torch"] + (["onnxruntime"] if onnxruntime_available() else [])
    if runtime not in measured:
        measured.append(runtime)  # compare_latency names what is missing
    runtimes = {
        r: compare_latency(original, compressed, shape, r, batch=batch, threads=threads, device=device) for r in measured
    }
    return {
        "runtime": runtime, "device": torch.device(device).type, "batch": batch, "threads": threads or torch.get_num_threads(),
        **runtimes[runtime], "slower": runtimes[runtime]["reduction"] < 0, "runtimes": runtimes,
    }
