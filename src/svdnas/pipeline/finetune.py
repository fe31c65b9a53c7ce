"""``svdnas finetune``: recovery of a compressed run directory, as a pipeline of its own."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas import distributed as ddp
from svdnas.data.datasets import DataBundle
from svdnas.data.evaluate import evaluate
from svdnas.errors import DataError, SpecError
from svdnas.lowrank.plan import Plan
from svdnas.models.build import build_model
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import (
    RECOVERY_MODES,
    fidelity,
    obtain_synthetic,
    recover,
    split_synthetic,
    synthetic_summary,
)
from svdnas.recovery.synthetic import SynthConfig
from svdnas.report.build import build_report
from svdnas.runs.directory import load_run, write_run
from svdnas.surgery.trace import example_input, trace_layers


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
    import json


    t_start = time.perf_counter()
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
    student, teacher = student.to(device), teacher.to(device).eval()
    config = config or FinetuneConfig(mode="synthetic" if mode == "data-free" else mode)
    seconds: dict[str, float] = {}
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    splits = None
    if mode in ("synthetic", "data-free"):
        t0 = time.perf_counter()
        synth = synth or SynthConfig()
        synthetic = obtain_synthetic(
            teacher, shape, synth, seed, device, out_dir, synthetic_path, (lambda d, t: progress("synthetic", d, t)) if progress else None,
        )
        splits = split_synthetic(synthetic, synth_val, synth_test)
        seconds["synthetic"] = time.perf_counter() - t0
    before = evaluate(student, data.test, device) if data is not None and ddp.is_main() else None
    ckpt = out_dir / "checkpoint-finetune.pt" if out_dir is not None and resume else None
    block = recover(
        teacher, student, plan, mode, config, data, splits, device, seed, ckpt, (lambda d, t: progress("finetune", d, t)) if progress else None,
    )
    seconds["finetune"] = block["seconds"]
    if not ddp.is_main():  # under torchrun, rank 0 evaluates and writes
        return student, {}
    infos = trace_layers(teacher, example_input(teacher, shape))
    previous = json.loads((directory / "report.json").read_text()) if (directory / "report.json").is_file() else {}
    header = {
        "model": arch["base"], "method": previous.get("method", "svdnas"), "mode": mode, "objective": previous.get("objective", "flops"),
        "seed": seed, "source": str(directory),
    }
    report = build_report(teacher, student, plan, infos, shape, data, device, header, progress=progress)
    if before is not None:
        block["before"] = {"top1": before["top1"], "top5": before["top5"]}
        block["after"] = {"top1": report["top1"]["compressed"], "top5": report["top5"]["compressed"]}
    if splits is not None:
        report["fidelity"] = fidelity(student, teacher, splits.test, device)
        report["synthetic"] = synthetic_summary(splits.meta) | {"images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}}
    report["recovery"] = block
    seconds["search"] = float(previous.get("seconds", {}).get("search", 0.0))
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = seconds
    if out_dir is not None:
        write_run(out_dir, student, plan, arch["base"], shape, report)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
    return student, report
