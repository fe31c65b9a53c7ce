"""Latency against rank for one layer's low-rank block, in ONNX Runtime and PyTorch eager: where do
the runtimes' kernels step?

    .venv/bin/python -m benchmarks.diagnostics.rank_staircase --layer layer3.0.conv2 --family 3x1

Each rank of the family (every ``--step``-th) is built as the block ``svdnas.decompose`` makes, then
timed alone at batch 1 on the layer's input size (interleaved rounds; the median of ``--rounds``
medians), beside the original layer. ONNX Runtime's CPU provider also reports whether the block's
convolutions stay in its blocked channel layout (NCHWc) or need reorders around them. Writes
benchmarks/results/rank_staircase/<model>_<layer>_<family>.json.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import markdown_table, parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.onnx import onnx_bytes, require_onnx
from svdnas.cost.timer import measure
from svdnas.lowrank.decompose import decompose
from svdnas.lowrank.geometry import layer_geometry
from svdnas.lowrank.spec import LowRankSpec, family_max_rank
from svdnas.models.build import build_model
from svdnas.surgery.trace import example_input, trace_layers


def ort_runner(module: torch.nn.Module, x: torch.Tensor, threads: int, tmp: str):
    onnx, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.optimized_model_filepath, opts.log_severity_level = tmp, 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")  # many sessions alive: none may hold the cores
    session = ort.InferenceSession(onnx_bytes(module, x, dynamic_batch=False), opts, providers=["CPUExecutionProvider"])
    reorders = sum(node.op_type.startswith("Reorder") for node in onnx.load(tmp).graph.node)
    feed = {"input": x.numpy()}
    return (lambda: session.run(None, feed)), reorders


def main() -> None:
    p = parser(__doc__, data=None, out="JSON to write")
    p.add_argument("--layer", default="layer3.0.conv2")
    p.add_argument("--family", default="3x1", help="the first layer's kernel, e.g. 3x1, 1x1, 3x3")
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    setup(args, manual_seed=0)
    model, info = build_model(args.model)
    model.eval()
    infos = trace_layers(model, example_input(model, info.input_shape))
    layer = model.get_submodule(args.layer)
    hw = infos[args.layer].input_hw
    x = torch.randn(1, layer.in_channels, *hw)
    fk = tuple(int(v) for v in args.family.split("x"))
    g = layer_geometry(layer)
    top = family_max_rank(LowRankSpec(fk), g.out_channels, g.in_channels, g.kernel)
    ranks = list(range(1, top + 1, args.step))
    modules = {"original": layer, **{r: decompose(layer, [LowRankSpec(fk, (1, 1), r)]).eval() for r in ranks}}
    tmp = str(Path(tempfile.mkdtemp()) / "optimized.onnx")
    runners, reorders = {}, {}
    for key, m in modules.items():
        runners[key], reorders[key] = ort_runner(m, x, args.threads, tmp)
    eager = {key: (lambda m=m: m(x)) for key, m in modules.items()}
    times: dict[str, dict] = {"onnxruntime": {k: [] for k in modules}, "torch": {k: [] for k in modules}}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for key in modules:
                times["onnxruntime"][key].append(measure(runners[key], warmup=3, repeats=15)["median_ms"])
                times["torch"][key].append(measure(eager[key], warmup=3, repeats=15)["median_ms"])
    med = {rt: {str(k): statistics.median(v) for k, v in per.items()} for rt, per in times.items()}
    rows = [[str(k), f"{med['onnxruntime'][str(k)]:.4f}", str(reorders[k]), f"{med['torch'][str(k)]:.4f}"] for k in modules]
    print(f"{args.model} {args.layer} ({g.out_channels}x{g.in_channels}x{g.kernel[0]}x{g.kernel[1]}, input {hw[0]}x{hw[1]}), "
          f"{args.family} first, batch 1, {args.threads} threads")
    print(markdown_table(["rank", "onnxruntime ms", "reorder nodes", "torch ms"], rows))
    name = f"{short_name(args.model)}_{args.layer}_{args.family}.json"
    out = write_json(args.out or result_path("rank_staircase", name), {
        "model": args.model, "layer": args.layer, "family": args.family, "input_hw": list(hw),
        "median_ms": med, "reorders": {str(k): v for k, v in reorders.items()}, **stamp(args.threads)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
