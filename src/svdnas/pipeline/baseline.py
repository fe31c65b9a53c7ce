"""``svdnas baseline``: a published competitor's plan under the same budget, evaluated and written like compress."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from svdnas.baselines.methods import FIXED_SPLITS, METHODS, SPLITS, plan_and_notes
from svdnas.cost.counting import count_params, model_macs
from svdnas.data.datasets import search_subset
from svdnas.data.evaluate import evaluate
from svdnas.errors import SpecError
from svdnas.models.weights import check_finite
from svdnas.report.build import build_report
from svdnas.runs.directory import write_run
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import require_targets
from svdnas.surgery.trace import example_input, trace_layers


def run_baseline(
    method: str,
    model: nn.Module,
    data,
    reduction: float,
    input_shape: tuple[int, int, int] | None = None,
    filter_fn="all-but-first",
    split: str = "kx1",
    objective: str = "flops",
    search_images: int = 1000,
    device: torch.device | str = "cpu",
    seed: int = 0,
    out=None,
    model_spec: str = "python:model",
    reference: dict[str, float] | None = None,
):
    """A baseline end to end: plan, derivation, evaluation, report and run directory.

    Returns:
        (compressed model, plan, report).
    """
    import copy
    import time


    if method not in METHODS:
        raise SpecError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < reduction < 1:
        raise SpecError(f"--reduction must be in (0, 1), got {reduction}")
    t_start = time.perf_counter()
    shape = tuple(input_shape or data.input_shape)
    model = model.to(device).eval()
    check_finite(model.state_dict(), "the model")
    infos = trace_layers(model, example_input(model, shape))
    targets, skipped = require_targets(model, infos, filter_fn)
    total = float(model_macs(model, shape) if objective == "flops" else count_params(model))
    if method in FIXED_SPLITS:
        splits = [FIXED_SPLITS[method]]
    else:
        splits = list(SPLITS) if split == "best" else [split]
    chosen = None
    tried = {}
    notes: dict[str, dict[str, Any]] = {}
    for sp in splits:
        plan, notes[sp] = plan_and_notes(method, model, infos, targets, reduction, total, sp, objective)
        compressed = apply_plan(copy.deepcopy(model), plan)
        if len(splits) > 1:
            subset, _ = search_subset(data.train, search_images, seed)
            tried[sp] = evaluate(compressed, subset, device)["top1"]
            if chosen is None or tried[sp] > tried[chosen[0]]:
                chosen = (sp, plan, compressed)
        else:
            chosen = (sp, plan, compressed)
    sp, plan, compressed = chosen  # type: ignore[misc]
    seconds = {"search": time.perf_counter() - t_start, "finetune": 0.0}
    header = {"model": model_spec, "method": method, "mode": "post-training", "objective": objective, "seed": seed,
              "reduction_target": reduction, "split": sp}
    report = build_report(model, compressed, plan, infos, shape, data, device, header, reference=reference)
    report["method_choices"] = notes[sp]
    if tried:
        report["split_search"] = {"search_images": search_images, "top1_on_search_images": tried}
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = seconds
    report["skipped"] = [{"name": n, "reason": r} for n, r in skipped.items()]
    if out is not None:
        write_run(out, compressed, plan, model_spec, shape, report)
    return compressed, plan, report
