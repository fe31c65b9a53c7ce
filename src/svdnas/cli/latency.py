"""``svdnas latency``: measured inference latency (median of repeated runs)."""

from __future__ import annotations

import argparse
import inspect
import json

import torch

from svdnas.cli.common import add_common, add_model_args, device_of, input_shape, whole_number
from svdnas.cost.timer import measure

TIMING = {k: p.default for k, p in inspect.signature(measure).parameters.items() if p.default is not inspect.Parameter.empty}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="measured inference latency (median of repeated runs)")
    add_model_args(p)
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default=None,
                   help="measure in this runtime only (default: PyTorch, and ONNX Runtime with --onnx)")
    p.add_argument("--onnx", action="store_true", help="also measure ONNX Runtime (on the CPU, whatever --device says)")
    p.add_argument("--threads", type=whole_number(1), default=None, help="CPU threads (default: the process's)")
    p.add_argument("--batch", type=whole_number(1), default=1, help="images per run (default 1: one request)")
    p.add_argument("--warmup", type=whole_number(0), default=TIMING["warmup"], help=f"untimed runs first (default: {TIMING['warmup']})")
    p.add_argument("--repeats", type=whole_number(1), default=TIMING["repeats"], help=f"timed runs (default: {TIMING['repeats']})")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas.cost.timer import onnx_latency, torch_latency
    from svdnas.runs.directory import load_model
    from svdnas.surgery.trace import check_input

    device = device_of(args.device)
    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    shape = input_shape(args, info, None)
    check_input(model, shape)
    kw = {"batch": args.batch, "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats}
    result = {"model": info.spec, "batch": args.batch, "threads": args.threads or torch.get_num_threads()}
    if args.runtime in (None, "torch"):
        result["pytorch"] = torch_latency(model, shape, device=device, **kw)
        result["device"] = str(device)
    if args.runtime == "onnxruntime" or (args.runtime is None and args.onnx):
        result["onnxruntime"] = onnx_latency(model, shape, **kw)
    for engine in ("pytorch", "onnxruntime"):
        if engine in result and not args.json:
            r = result[engine]
            print(f"{engine:12s} median {r['median_ms']:.3f} ms  (p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f}; {r['repeats']} runs, batch {args.batch})")
    if args.json:
        print(json.dumps(result))
    return 0
