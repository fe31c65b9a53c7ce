"""Ranks in whole channel blocks: the demo's compression with ``--rank-multiple 1`` (the paper's grid,
any rank) beside the default (ONNX Runtime's channel block on this CPU), for accuracy and speed.

    .venv/bin/python -m benchmarks.diagnostics.rank_multiple --model zoo:resnet18 --reduction 0.6 --multiples 1 16

Each run is ``compress`` with every other default (post-training, the whole test split for top-1).
Then each compressed model is timed against the original with ``svdnas.cost.timer.compare_latency``
at batch 1 (ONNX Runtime at ``--threads`` and at one thread, PyTorch eager at ``--threads``), the
runs' models taking turns ``--trials`` times; and the Reorder nodes ONNX Runtime adds to its
optimised graph are counted (each moves a tensor in or out of the blocked NCHWc layout). Writes
benchmarks/results/rank_multiple/<model>.json.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import markdown_table, parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.onnx import reorder_nodes
from svdnas.cost.timer import compare_latency
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.models.build import build_model
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig


def reorders(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Reorder nodes in ONNX Runtime's optimised graph of ``model`` (batch 1, this CPU)."""
    return reorder_nodes(model, torch.randn(1, *input_shape))


TIMINGS = {"onnxruntime": ("onnxruntime", None), "onnxruntime, 1 thread": ("onnxruntime", 1), "torch": ("torch", None)}


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/rank_multiple/<model>.json)")
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 16])
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    setup(args)
    model, info = build_model(args.model)
    data = load_data(args.data)
    reference = evaluate(model, data.test)
    rows, models = [], []
    for m in args.multiples:
        result = compress(model, data, CompressConfig(reduction=args.reduction, rank_multiple=m), input_shape=info.input_shape,
                          filter_fn=info.default_filter, seed=args.seed, reference=reference)
        rep = result.report
        rows.append({"rank_multiple": m, "flops_reduction": rep["flops"]["reduction"], "drop_pp": rep["top1"]["drop_pp"],
                     "reorders": reorders(result.model, info.input_shape), "compress_seconds": rep["seconds"].get("total"),
                     "layers": [{"name": e["name"], "branches": e["branches"]} for e in rep["layers"]], "timings": {k: [] for k in TIMINGS}})
        models.append(result.model)
        print(f"--rank-multiple {m}: FLOPs -{100 * rep['flops']['reduction']:.2f}%, drop {rep['top1']['drop_pp']:.2f} pp, "
              f"{rows[-1]['reorders']} Reorder nodes", flush=True)
    print(f"original: {reorders(model, info.input_shape)} Reorder nodes")
    for trial in range(args.trials):
        for row, compressed in zip(rows, models):
            for key, (runtime, threads) in TIMINGS.items():
                r = compare_latency(model, compressed, info.input_shape, runtime, threads=threads or args.threads)
                row["timings"][key].append(r)
                print(f"trial {trial}, --rank-multiple {row['rank_multiple']}, {key}: reduction {r['reduction']:+.3f}", flush=True)
    table = []
    for row in rows:
        med = {k: statistics.median(r["reduction"] for r in v) for k, v in row["timings"].items()}
        row["median_reduction"] = med
        table.append([row["rank_multiple"], f"{100 * row['flops_reduction']:.2f}%", f"{row['drop_pp']:.2f}", row["reorders"],
                      *(f"{100 * med[k]:.1f}%" for k in TIMINGS)])
    print(f"\n{args.model} at R = {args.reduction}, original top-1 {reference['top1']:.2f}; latency reduction at batch 1, "
          f"median of {args.trials} comparisons")
    print(markdown_table(["--rank-multiple", "FLOPs reduction", "top-1 drop (pp)", "Reorder nodes",
                          f"onnxruntime, {args.threads} threads", "onnxruntime, 1 thread", f"torch, {args.threads} threads"], table))
    out = write_json(args.out or result_path("rank_multiple", f"{short_name(args.model)}.json"),
                     {"model": args.model, "reduction": args.reduction, "original_top1": reference["top1"], "rows": rows, **stamp(args.threads)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
