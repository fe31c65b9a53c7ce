"""``compress``: the whole SVD-NAS job, as a sequence of the named stages in :mod:`svdnas.pipeline.stages`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas import distributed as ddp
from svdnas.data.datasets import DataBundle
from svdnas.lowrank.plan import Plan
from svdnas.pipeline import stages
from svdnas.pipeline.config import CompressConfig
from svdnas.pipeline.images import synthetic_splits
from svdnas.runs.directory import RunDir, save_config
from svdnas.surgery.targets import FilterFn


@dataclass
class CompressResult:
    """The compressed model, its plan, the report (as in report.json) and the search's history (history.json)."""

    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    history: dict[str, Any] = field(default_factory=dict)


def compress(
    model: nn.Module,
    data: DataBundle | None,
    config: CompressConfig,
    *,
    input_shape: tuple[int, int, int] | None = None,
    filter_fn: FilterFn | str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    out: str | Path | RunDir | None = None,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    reference: dict[str, float] | None = None,
) -> CompressResult:
    """Compress ``model`` by SVD-NAS; the model passed in is neither moved nor modified.

    Args:
        model: a pre-trained model.
        data: labelled data; search images come from its training split, accuracy from its test split.
            None only in ``data-free`` mode (accuracies are then None; ``fidelity`` is reported).
        config: budget, objective and search settings.
        input_shape: (C, H, W) of one input; defaults to the data's.
        filter_fn: which layers to compress (a preset name or a ``(module, name) -> bool``); defaults
            to the config's, then ``all-but-first``.
        out: run directory to write, if any: a path, or a :class:`~svdnas.runs.directory.RunDir` that
            also says how the base model is rebuilt when the run is loaded.
        resume: checkpoint every stage in ``out`` and pick up from what a killed run left there
            (the result equals an uninterrupted run's).
        progress: called with (stage, done, total).
        reference: the original model's top-1/top-5 on the test split, if already measured.
    """
    stages.check_data(config.mode, data)
    # the caller's random state is left as it was: the search draws from generators of its own, and
    # what else draws (a module's initial weights, overwritten at once) does so inside this fork
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        return _compress(model, data, config, input_shape, filter_fn, device, seed, out, resume, progress, reference)


def _compress(model, data, config, input_shape, filter_fn, device, seed, out, resume, progress, reference) -> CompressResult:
    job = stages.prepare(model, data, input_shape, filter_fn or config.filter or "all-but-first", device, seed, out, resume, progress, reference)
    if job.run is not None and ddp.is_main():
        save_config(job.run, config, seed=seed)  # first: it marks the folder as a run of svdnas
    candidates = stages.make_candidates(job, config)
    images = stages.search_images(job, config)
    calibration = stages.calibration_set(images.search, config.calibration_images)
    derivation = stages.calibrate(job, config.derivation, {n: c.specs for n, c in candidates.items()}, calibration,
                                  config.calibration_patches)
    pruned = stages.prune(job, config, candidates, images.proxy, derivation)
    searched = stages.check_plan(job, config, pruned, images, stages.search_plan(job, config, pruned, images))
    searched = stages.meet_latency_budget(job, config, pruned, searched)
    compressed = stages.derive_model(job, searched.plan, derivation, calibration, images.proxy)
    recovered = stages.recover(
        job, config.mode, compressed, searched.plan, config.finetune, images.synthetic,
        lambda: synthetic_splits(job.model, job.shape, config, seed, job.device, job.run.path if job.run else None, progress, job.seconds),
    )
    if not ddp.is_main():  # under torchrun, rank 0 evaluates and writes
        return CompressResult(compressed, searched.plan, {}, searched.history)
    timing = {"latency_batch": pruned.latency.table["batch"], "latency_threads": pruned.latency.table["threads"]} if pruned.latency else {}
    timing["runtime"] = config.runtime
    report = stages.report(job, compressed, searched.plan, stages.search_header(job, config, searched.config), recovered, **timing)
    summary = stages.search_summary(job, config, pruned, searched, images)
    if "latency_predicted" in summary:
        report["latency"]["predicted"] = summary.pop("latency_predicted")
    if searched.measured_budget is not None:
        report["latency"]["measured_budget"] = searched.measured_budget
    for entry in report["layers"]:
        entry["candidates"] = len(pruned.candidates[entry["name"]]) - 1 if entry["name"] in pruned.candidates else 0
    stages.finish(job, report)
    report |= summary
    if searched.branch_reports:
        report["branches"] = searched.branch_reports | {"b2": {k: report[k] for k in ("flops", "params", "top1", "top5")}}
    stages.write(job, compressed, searched.plan, report, history=searched.history)
    return CompressResult(compressed, searched.plan, report, searched.history)
