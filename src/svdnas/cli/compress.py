"""``svdnas compress``: the whole SVD-NAS pipeline into a run directory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from svdnas.cli.common import (
    add_common,
    add_model_args,
    add_out_args,
    check_out,
    cli_record,
    device_of,
    model_and_data,
    need,
    nested_of,
    print_latency,
    print_outcome,
    run_claimed,
    write_report_quietly,
)
from svdnas.cli.options import Section, add_section, build, section_values
from svdnas.cost.table import LatencyConfig
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.synthetic import SynthConfig
from svdnas.search.loop import SearchConfig

# what compress records beside its config in config.json
CLI_OPTIONS = ("model", "weights", "data", "input_shape", "allow_code", "device", "seed", "out")


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of ``cls`` (made, for a ``default_factory``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


MAIN = Section(CompressConfig)
SEARCH = Section(SearchConfig, "search", defaults=default_of(CompressConfig, "search").to_dict())
FINETUNE = Section(FinetuneConfig, "finetune")
SYNTH = Section(SynthConfig, "synth", defaults=default_of(CompressConfig, "synth").to_dict(), flags={"num": "--synth-images"})
LATENCY = Section(LatencyConfig, "latency")
SECTIONS = [MAIN, SEARCH, FINETUNE, SYNTH, LATENCY]


def recovery_mode(mode: str) -> str:
    """The fine-tuning mode of a run's --mode (data-free recovers on synthetic images)."""
    return "synthetic" if mode == "data-free" else mode


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="the SVD-NAS pipeline: search, derive, evaluate, write a run directory")
    add_model_args(p)
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR, imagefolder:DIR (none: data-free only)")
    add_out_args(p)
    for section in SECTIONS:
        add_section(p, section)
    add_common(p, SECTIONS)
    p.set_defaults(func=run)


def make_config(args: argparse.Namespace) -> CompressConfig:
    """The CompressConfig the options (and --config) describe, validated by its dataclasses."""
    main = section_values(MAIN, args)
    mode = main.get("mode", default_of(CompressConfig, "mode"))
    search = build(SEARCH, args, nested_of(args, "search"))
    finetune = None if mode == "post-training" else build(FINETUNE, args, nested_of(args, "finetune"), mode=recovery_mode(mode))
    synth = build(SYNTH, args, nested_of(args, "synth"))
    latency = build(LATENCY, args, nested_of(args, "latency"))  # the latency objective's table, or the one timing candidates
    return CompressConfig.from_dict({**main, "search": search, "finetune": finetune, "synth": synth, "latency": latency})


def run(args: argparse.Namespace) -> int:
    from svdnas import distributed as ddp
    from svdnas.pipeline.compress import compress
    from svdnas.runs.directory import RunDir, config_record

    need(args, "data", "out")
    config = make_config(args)  # options first: a bad one is reported before a model or data set is loaded
    check_out(args)
    device = device_of(args.device)
    ddp.init(device)
    model, info, data, shape = model_and_data(args, device, data_free=config.mode == "data-free")
    config.filter = config.filter or info.default_filter
    claimed = run_claimed(
        args, lambda: config_record(config, **cli_record(args, *CLI_OPTIONS)), "search",
        lambda progress: compress(model, data, config, input_shape=shape, device=device, seed=args.seed,
                                  out=RunDir(Path(args.out), base=info.spec), resume=True, progress=progress),
    )
    if claimed is None:
        return 0
    result, replacement = claimed
    r = result.report
    print(f"{info.spec}: FLOPs -{100 * r['flops']['reduction']:.2f}%  params -{100 * r['params']['reduction']:.2f}%")
    print_outcome(r)
    if "branches" in r:
        for b in ("b1", "b2"):
            x = r["branches"][b]
            print(f"  {b.upper()}: FLOPs -{100 * x['flops']['reduction']:.2f}%  top-1 drop {x['top1']['drop_pp']:.2f}pp")
    print_latency(r)
    write_report_quietly(args.out)
    replacement.finish()
    print(f"search {r['seconds']['search']:.1f}s, total {r['seconds']['total']:.1f}s; run directory {args.out}")
    return 0
