"""``svdnas eval``: top-1, top-5, FLOPs and params of any MODEL."""

from __future__ import annotations

import argparse
import json

from svdnas.cli.common import add_common, add_model_args, device_of, model_and_data, need, progress_bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1, top-5, FLOPs and params of a model")
    add_model_args(p)
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR or imagefolder:DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas.cost.counting import count_params, model_macs
    from svdnas.data.evaluate import evaluate_cached

    need(args, "data")
    device = device_of(args.device)
    model, info, data, shape = model_and_data(args, device)
    with progress_bar(args, len(data.test), "eval") as bar:
        acc, _ = evaluate_cached(model, data.test, device, progress=bar.update)
    result = {"top1": acc["top1"], "top5": acc["top5"], "flops": 2 * model_macs(model, shape), "params": count_params(model)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model   {info.spec}")
        print(f"top-1   {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   ({len(data.test)} images)")
        print(f"FLOPs   {result['flops'] / 1e6:.2f} M   params {result['params'] / 1e6:.3f} M")
    return 0
