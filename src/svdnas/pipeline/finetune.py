"""``svdnas finetune``: recovery of a compressed run directory, as a pipeline of its own."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas import distributed as ddp
from svdnas.data.datasets import DataBundle
from svdnas.errors import DataError, SpecError
from svdnas.lowrank.plan import Plan
from svdnas.models.build import build_model
from svdnas.pipeline import stages
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import (
    RECOVERY_MODES,
    SyntheticSplits,
    obtain_synthetic,
    split_synthetic,
)
from svdnas.recovery.synthetic import SynthConfig
from svdnas.runs.directory import RunDir, load_run


def finetune(
    directory: str | Path,
    mode: str,
    data: DataBundle | None,
    out: str | Path | None = None,
    config: FinetuneConfig | None = None,
    synth: SynthConfig | None = None,
    synthetic_path: str | Path | None = None,
    synth_val: int = 128,
    synth_test: int = 256,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    allow_code: bool = False,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Recover a compressed run directory by distillation; write the result to ``out``.

    Args:
        directory: a run directory written by compress or baseline.
        mode: ``synthetic``, ``few-shot``, ``full`` or ``data-free`` (synthetic images, no real one
            read except to report accuracy; ``data`` may be None).
        teacher: the original model; default: the run's base spec rebuilt with its pre-trained weights.
        synthetic_path: reuse synthetic images written by ``svdnas synth`` instead of making them.
        synth_val, synth_test: synthetic images held out for the schedule and for the fidelity figure.

    Returns:
        the fine-tuned model and its report (also written to ``out``).
    """
    directory = Path(directory)
    if mode not in RECOVERY_MODES:
        raise SpecError(f"--mode must be one of {', '.join(RECOVERY_MODES)} for finetune, got {mode!r}")
    student, info = load_run(directory, allow_code=allow_code)
    arch = json.loads((directory / "architecture.json").read_text())
    plan = Plan.from_dict(arch["plan"])
    if teacher is None:
        teacher, _ = build_model(arch["base"], allow_code=allow_code)
    shape = tuple(info.input_shape or (data.input_shape if data is not None else ()))
    if len(shape) != 3:
        raise SpecError(f"cannot tell the input shape of {directory}")
    if data is not None and tuple(data.input_shape) != shape:
        raise DataError(f"{directory} takes inputs {shape}, but {data.name} has {data.input_shape}")
    run = RunDir(Path(out), arch["base"]) if out is not None else None
    job = stages.prepare(teacher, data, shape, lambda m, n: n in plan.layers, device, seed, run, resume, progress)
    student = student.to(job.device)
    if run is not None:
        run.path.mkdir(parents=True, exist_ok=True)

    def make_synthetic() -> SyntheticSplits:
        t0 = time.perf_counter()
        synthetic = obtain_synthetic(job.model, shape, synth or SynthConfig(), seed, job.device, run.path if run else None, synthetic_path, job.ticker("synthetic"))
        job.seconds["synthetic"] = time.perf_counter() - t0
        return split_synthetic(synthetic, synth_val, synth_test)

    recovered = stages.recover(job, mode, student, plan, config, make_synthetic=make_synthetic)
    if not ddp.is_main():  # under torchrun, rank 0 evaluates and writes
        return student, {}
    previous = json.loads((directory / "report.json").read_text()) if (directory / "report.json").is_file() else {}
    header = {
        "model": arch["base"], "method": previous.get("method", "svdnas"), "mode": mode, "objective": previous.get("objective", "flops"),
        "seed": seed, "source": str(directory),
    }
    if recovered.block is not None and "before" in recovered.block:
        recovered.block["before"] = {k: recovered.block["before"][k] for k in ("top1", "top5")}
    report = stages.report(job, student, plan, header, recovered)
    job.seconds["search"] = float(previous.get("seconds", {}).get("search", 0.0))
    stages.finish(job, report)
    stages.write(job, student, plan, report)
    return student, report
