"""``svdnas space``: the size of each target layer's LR-space."""

from __future__ import annotations

import argparse
import json

from svdnas.cli.common import add_common, add_model_args, input_shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("space", help="size of the LR-space of each target layer")
    add_model_args(p)
    p.add_argument("--filter", default=None, help="target layers: all-but-first, convs, pointwise, linear, convs+linear")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas.lowrank.space import count_space
    from svdnas.runs.directory import load_model
    from svdnas.surgery.targets import select_targets
    from svdnas.surgery.trace import example_input, trace_layers

    model, info = load_model(args.model, args.weights, pretrained=False)
    shape = input_shape(args, info, None)
    infos = trace_layers(model, example_input(model, shape))
    targets, skipped = select_targets(model, infos, args.filter or info.default_filter)
    total = 0
    rows = []
    for name in targets:
        layer = model.get_submodule(name)
        n = count_space(layer)
        total += n
        rows.append({"name": name, "shape": list(layer.weight.shape), "candidates": n})
        if not args.json:
            print(f"{name:40s} {tuple(layer.weight.shape)!s:22s} {n:8d}")
    if args.json:
        print(json.dumps({"layers": rows, "total": total, "skipped": skipped}))
    else:
        print(f"{'total':40s} {'':22s} {total:8d}")
        for name, reason in skipped.items():
            print(f"left alone: {name}: {reason}")
    return 0
