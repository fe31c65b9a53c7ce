"""``run_baseline``: a published competitor's plan under the same budget, evaluated and written like compress."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas.baselines.methods import FIXED_SPLITS, METHODS, SPECTRAL, SPLITS, plan_and_notes, split_specs
from svdnas.data.datasets import DataBundle, search_subset
from svdnas.data.evaluate import evaluate
from svdnas.errors import SpecError
from svdnas.lowrank.calibration import PATCHES_PER_COLUMN
from svdnas.lowrank.derivation import KINDS, Derivation
from svdnas.lowrank.plan import Plan
from svdnas.pipeline import stages
from svdnas.runs.directory import PYTHON_BASE, RunDir
from svdnas.surgery.targets import FilterFn

OWN_DERIVATION = {"balf": "whitened"}  # the others' papers derive from the weight
HELD_OUT_IMAGES = 256  # as many as compress's proxy images: where the prefix fit checks each layer's factors


def check_options(method: str, reduction: float, derivation: str | None, calibration_images: int, calibration_patches: int,
                  search_images: int) -> str:
    """The derivation a baseline run uses, once its options are checked (before anything is loaded or written).

    Raises:
        SpecError: an unknown method or derivation, a reduction outside (0, 1), an image or patch count out of range.
    """
    if method not in METHODS:
        raise SpecError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < reduction < 1:
        raise SpecError(f"--reduction must be in (0, 1), got {reduction}")
    kind = derivation or OWN_DERIVATION.get(method, "weight")
    if kind not in KINDS:
        raise SpecError(f"--derivation must be one of {', '.join(KINDS)}, got {kind!r}")
    if calibration_images < 1:
        raise SpecError("--calibration-images must be positive")
    if calibration_patches < 0:
        raise SpecError(f"--calibration-patches must be 0 (every patch) or positive, got {calibration_patches}")
    if search_images < 1:
        raise SpecError(f"--search-images must be positive, got {search_images}")
    return kind


def run_baseline(
    method: str,
    model: nn.Module,
    data: DataBundle,
    reduction: float,
    input_shape: tuple[int, int, int] | None = None,
    filter_fn: FilterFn | str = "all-but-first",
    split: str = "kx1",
    objective: str = "flops",
    search_images: int = 1000,
    device: torch.device | str = "cpu",
    seed: int = 0,
    out: str | Path | RunDir | None = None,
    reference: dict[str, float] | None = None,
    derivation: str | None = None,
    calibration_images: int = 512,
    calibration_patches: int = PATCHES_PER_COLUMN,
    progress: stages.Progress | None = None,
) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """A baseline end to end: plan, derivation, evaluation, report and run directory; ``model`` is not modified.

    Args:
        split: what the first layer holds for ``uniform`` and ``energy`` (``kxk``, ``1x1``, ``kx1``,
            ``1xk``), or ``best``: each tried, the best on ``search_images`` training images kept.
        derivation: how the plan's factors are derived (as compress's ``--derivation``); the spectral
            methods (energy, lrs2, balf) also read their ranks from its spectra. None: the method's
            own (whitened for balf, the weight for the others).
        calibration_images: training images (drawn with ``seed``) whose layer inputs make the
            output-aware derivations' statistics; ``prefix`` also draws 256 images apart from them,
            on which each layer keeps the fitted factors or the whitened ones, whichever errs less.
        calibration_patches: input patches per column each moment sums at least (0: every patch).
        progress: called as ``progress(stage, done, total)`` as the prefix fit and the evaluation go on.

    Returns:
        (compressed model, plan, report).
    """
    kind = check_options(method, reduction, derivation, calibration_images, calibration_patches, search_images)
    job = stages.prepare(model, data, input_shape, filter_fn, device, seed, out, reference=reference, progress=progress)
    total = job.total(objective)
    splits = [FIXED_SPLITS[method]] if method in FIXED_SPLITS else list(SPLITS) if split == "best" else [split]
    calibration = held_out = None
    if kind != "weight":
        calibration, drawn = search_subset(data.train, calibration_images, seed)
        if kind == "prefix":
            held_out = search_subset(data.train, min(HELD_OUT_IMAGES, len(data.train) - len(drawn)), seed + 1, exclude=drawn)[0]
    spectra = Derivation()
    if kind != "weight" and method in SPECTRAL:  # the ranks follow the derivation's spectra: statistics first
        per_split = [split_specs(job.targets, job.model, sp) for sp in splits]
        families = {n: [s for specs in per_split for s in specs[n]] for n in job.targets}
        spectra = stages.calibrate(job, kind, families, calibration, calibration_patches)
    chosen = None
    tried: dict[str, float] = {}
    notes: dict[str, dict[str, Any]] = {}
    calibrations: dict[str, Any] = {}  # per split: its statistics and prefix fit, for the report
    searching = 0.0  # the method's own choices: its allocation, and with several splits the split's
    for sp in splits:
        t0 = time.perf_counter()
        plan, notes[sp] = plan_and_notes(method, job.model, job.infos, job.targets, reduction, total, sp, objective, spectra)
        searching += time.perf_counter() - t0
        derived = spectra if kind == "weight" or method in SPECTRAL else stages.calibrate(job, kind, plan.compressed(), calibration, calibration_patches)
        compressed = stages.derive_model(job, plan, derived, calibration, held_out)
        calibrations[sp] = job.calibration
        if len(splits) > 1:
            t0 = time.perf_counter()
            subset, _ = search_subset(data.train, search_images, seed)
            tried[sp] = evaluate(compressed, subset, job.device)["top1"]
            searching += time.perf_counter() - t0
            if chosen is None or tried[sp] > tried[chosen[0]]:
                chosen = (sp, plan, compressed)
        else:
            chosen = (sp, plan, compressed)
    sp, plan, compressed = chosen  # type: ignore[misc]
    job.seconds["search"] = searching
    job.seconds["finetune"] = 0.0
    header = {"model": job.run.base if job.run is not None else PYTHON_BASE, "method": method, "mode": "post-training",
              "objective": objective, "seed": seed, "reduction_target": reduction, "split": sp, "derivation": kind}
    report = stages.report(job, compressed, plan, header)
    report["method_choices"] = notes[sp]
    if calibrations.get(sp) is not None:
        report["calibration"] = calibrations[sp]
    if tried:
        report["split_search"] = {"search_images": search_images, "top1_on_search_images": tried}
    stages.finish(job, report)
    stages.write(job, compressed, plan, report)
    return compressed, plan, report
