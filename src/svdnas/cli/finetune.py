"""``svdnas finetune``: knowledge-distillation recovery of a compressed run directory into another."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdnas.cli.common import (
    add_common,
    add_out_args,
    check_out,
    cli_record,
    device_of,
    need,
    nested_of,
    print_outcome,
    run_claimed,
    write_report_quietly,
)
from svdnas.cli.compress import default_of, recovery_mode
from svdnas.cli.options import Section, add_section, build, section_values
from svdnas.errors import SpecError, SvdnasError
from svdnas.pipeline.config import CompressConfig, check_synthetic_splits
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import RECOVERY_MODES
from svdnas.recovery.synthetic import SynthConfig

FINETUNE = Section(FinetuneConfig, "finetune")
SYNTH = Section(SynthConfig, "synth", defaults=default_of(CompressConfig, "synth").to_dict(), flags={"num": "--synth-images"})
IMAGES = Section(CompressConfig, only=("synthetic_path", "synth_val", "synth_test"))
SECTIONS = [IMAGES, FINETUNE, SYNTH]
CLI_OPTIONS = ("dir", "data", "mode", "teacher", "teacher_weights", "allow_code", "device", "seed", "out")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="knowledge-distillation recovery of a compressed run directory")
    p.add_argument("dir", help="a run directory written by compress or baseline")
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR, imagefolder:DIR (none: data-free only)")
    p.add_argument("--mode", default=None, choices=RECOVERY_MODES)
    add_out_args(p)
    p.add_argument("--teacher", default=None, help="the original model (default: the run's base model with its weights)")
    p.add_argument("--teacher-weights", default=None)
    p.add_argument("--allow-code", action="store_true", help="let a module: base be rebuilt (runs its code)")
    for section in SECTIONS:
        add_section(p, section)
    add_common(p, SECTIONS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas import distributed as ddp
    from svdnas.data.datasets import load_data
    from svdnas.pipeline.finetune import finetune
    from svdnas.runs.directory import config_record, load_model

    need(args, "data", "out", "mode")
    images = {f: default_of(CompressConfig, f) for f in IMAGES.only or ()} | section_values(IMAGES, args)
    check_synthetic_splits(images["synth_val"], images["synth_test"])
    config = build(FINETUNE, args, nested_of(args, "finetune"), mode=recovery_mode(args.mode))
    synth = build(SYNTH, args, nested_of(args, "synth"))
    if Path(args.out).resolve() == Path(args.dir).resolve():
        raise SpecError("--out must be a directory of its own, not the run being fine-tuned")
    check_out(args)
    device = device_of(args.device)
    ddp.init(device)
    data = load_data(args.data)
    if data is None and args.mode != "data-free":
        raise SvdnasError(f"--mode {args.mode} needs real data: --data none works only with --mode data-free")
    teacher = None
    if args.teacher is not None:
        teacher, _ = load_model(args.teacher, args.teacher_weights, allow_code=args.allow_code)
    claimed = run_claimed(
        args, lambda: config_record(_Settings(config, synth, images), **cli_record(args, *CLI_OPTIONS)), "finetune",
        lambda progress: finetune(
            args.dir, args.mode, data, args.out, config, synth, images["synthetic_path"], images["synth_val"],
            images["synth_test"], teacher, device, args.seed, args.allow_code, resume=True, progress=progress,
        ),
    )
    if claimed is None:
        return 0
    (_, r), replacement = claimed
    print(f"{args.dir} fine-tuned ({args.mode}): FLOPs -{100 * r['flops']['reduction']:.2f}%")
    print_outcome(r)
    write_report_quietly(args.out)
    replacement.finish()
    print(f"fine-tuning {r['seconds']['finetune']:.1f}s; run directory {args.out}")
    return 0


class _Settings:
    """The configs of a fine-tuning as config.json records them."""

    def __init__(self, finetune: FinetuneConfig, synth: SynthConfig, images: dict) -> None:
        self.parts = {"finetune": finetune.to_dict(), "synth": synth.to_dict(), **images}

    def to_dict(self) -> dict:
        return dict(self.parts)
