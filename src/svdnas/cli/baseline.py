"""``svdnas baseline``: a published competitor at the same budget, with the outputs of compress."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from svdnas.baselines.methods import METHODS, SPLITS
from svdnas.cli.common import (
    add_common,
    add_model_args,
    add_out_args,
    check_out,
    cli_record,
    device_of,
    model_and_data,
    need,
    run_claimed,
    write_report_quietly,
)
from svdnas.lowrank.derivation import KINDS
from svdnas.pipeline.baseline import check_options, run_baseline
from svdnas.pipeline.config import OBJECTIVES

# run_baseline's own defaults are the command's
DEFAULTS = {k: p.default for k, p in inspect.signature(run_baseline).parameters.items() if p.default is not inspect.Parameter.empty}
CLI_OPTIONS = ("method", "model", "weights", "data", "input_shape", "allow_code", "device", "seed", "out",
               "reduction", "objective", "split", "filter", "search_images", "derivation", "calibration_images",
               "calibration_patches")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="a published competitor at the same budget, same outputs as compress")
    p.add_argument("method", choices=METHODS)
    add_model_args(p)
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR or imagefolder:DIR")
    p.add_argument("--reduction", type=float, default=None, help="share of the original cost to remove, 0 < R < 1")
    add_out_args(p, resume=False)
    p.add_argument("--objective", default=DEFAULTS["objective"], choices=[o for o in OBJECTIVES if o != "latency"],
                   help=f"the cost to reduce (default: {DEFAULTS['objective']})")
    p.add_argument("--split", default=DEFAULTS["split"], choices=[*SPLITS, "best"],
                   help=f"uniform and energy: what the first layer holds, or best (default: {DEFAULTS['split']}); "
                        "lrs2 (kx1), alds and fgroup (kxk) fix their own")
    p.add_argument("--filter", default=None, help="target layers (default: the paper's for the model)")
    p.add_argument("--search-images", type=int, default=DEFAULTS["search_images"],
                   help=f"images that pick the split for --split best (default: {DEFAULTS['search_images']})")
    p.add_argument("--derivation", default=None, choices=KINDS,
                   help="how the plan's factors are derived, as for compress; energy, lrs2 and balf read their ranks "
                        "from its spectra (default: the method's own: whitened for balf, weight for the others)")
    p.add_argument("--calibration-images", type=int, default=DEFAULTS["calibration_images"],
                   help=f"training images whose layer inputs make the output-aware statistics (default: {DEFAULTS['calibration_images']})")
    p.add_argument("--calibration-patches", type=int, default=DEFAULTS["calibration_patches"],
                   help="input patches per column each output-aware moment sums at least; where the images give more, every k-th "
                        f"is summed (0: every patch; default: {DEFAULTS['calibration_patches']})")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas.runs.directory import CONFIG_FORMAT, RunDir

    need(args, "data", "reduction", "out")
    check_options(args.method, args.reduction, args.derivation, args.calibration_images, args.calibration_patches, args.search_images)
    check_out(args)
    device = device_of(args.device)
    model, info, data, shape = model_and_data(args, device)
    args.filter = args.filter or info.default_filter
    (_, _, r), replacement = run_claimed(
        args, lambda: {"format": CONFIG_FORMAT, **cli_record(args, *CLI_OPTIONS)}, "plan",
        lambda progress: run_baseline(
            args.method, model, data, args.reduction, shape, args.filter, args.split, args.objective,
            args.search_images, device, args.seed, out=RunDir(Path(args.out), base=info.spec),
            derivation=args.derivation, calibration_images=args.calibration_images, calibration_patches=args.calibration_patches,
            progress=progress,
        ),
    )
    write_report_quietly(args.out)
    replacement.finish()
    print(f"{args.method} ({r['split']}, {r['derivation']} factors) on {info.spec}: FLOPs -{100 * r['flops']['reduction']:.2f}%  params -{100 * r['params']['reduction']:.2f}%")
    print(f"top-1 {r['top1']['original']:.2f}% -> {r['top1']['compressed']:.2f}% (drop {r['top1']['drop_pp']:.2f}pp); run directory {args.out}")
    return 0
