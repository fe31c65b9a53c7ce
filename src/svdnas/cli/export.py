"""``svdnas export``: ONNX export of a model, checked in ONNX Runtime against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdnas.cli.common import add_common, add_model_args, input_shape, need, whole_number
from svdnas.cost.onnx import DEFAULT_OPSET
from svdnas.errors import SpecError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX export, checked in ONNX Runtime against PyTorch")
    add_model_args(p)
    p.add_argument("--onnx", default=None, help="file to write (an existing one only with --overwrite)")
    p.add_argument("--opset", type=whole_number(1), default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas.runs.directory import load_model
    from svdnas.runs.export import export_onnx
    from svdnas.surgery.trace import check_input

    need(args, "onnx")
    path = Path(args.onnx)
    if path.is_dir():
        raise SpecError(f"--onnx {path} is a directory; name the file to write")
    if path.exists() and not args.overwrite:
        raise SpecError(f"--onnx {path} already exists; pass --overwrite to replace it")
    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    shape = input_shape(args, info, None)
    check_input(model, shape)
    result = export_onnx(model, shape, path, opset=args.opset)
    print(f"wrote {result['path']} (opset {result['opset']}); ONNX Runtime vs PyTorch max abs difference {result['max_abs_diff']:.2e}")
    return 0
