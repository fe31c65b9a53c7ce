"""The whole ``compress`` of an ImageNet-size ResNet-18 (random weights, 224x224, random images and
labels) on this machine: seconds and peak resident memory of every stage, the calibration
statistics' bytes, and the plan's latency in ONNX Runtime and PyTorch eager at batch 1 and a
throughput batch.

    .venv/bin/python -m benchmarks.diagnostics.imagenet_compress [--reduction 0.6] [--images 256] [--objective latency]

Random weights and images say nothing of accuracy; what they measure is what the model's size
costs: memory, time, and how fast the plan's model runs. The search learns for one epoch over
``--images`` images; the calibration statistics are taken on the same images; the accuracy proxy
runs on ``--proxy-images`` more. With ``--objective latency`` the lookup table is timed fresh (a
temporary file) and the report's measured budget is written too. Writes
benchmarks/results/imagenet_compress/<model>_<reduction>[_latency].json.
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.table import LatencyConfig
from svdnas.cost.timer import compare_latency, onnxruntime_available
from svdnas.data.datasets import DataBundle
from svdnas.models.build import build_model
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig


def random_bundle(shape: tuple[int, int, int], classes: int, train: int, test: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))

    return DataBundle(split(train), split(test), shape, classes, "random")


def main() -> None:
    p = parser(__doc__, model="zoo:resnet18_imagenet", data=None, out="JSON to write (default benchmarks/results/imagenet_compress/<model>_<reduction>.json)")
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--images", type=int, default=256, help="search and calibration images (one epoch)")
    p.add_argument("--proxy-images", type=int, default=64)
    p.add_argument("--throughput-batch", type=int, default=32, help="0: batch 1 only")
    p.add_argument("--objective", default="flops", choices=("flops", "latency"))
    args = p.parse_args()
    setup(args, manual_seed=0)
    model, info = build_model(args.model)
    shape = tuple(info.input_shape)
    with torch.no_grad():
        classes = model.eval()(torch.zeros(1, *shape)).shape[-1]
    data = random_bundle(shape, classes, args.images + args.proxy_images, 32)
    config = CompressConfig(
        reduction=args.reduction, search_images=args.images, proxy_images=args.proxy_images, calibration_images=args.images,
        search=SearchConfig(epochs=1, batch_size=32, target=1 - args.reduction), objective=args.objective,
        latency=LatencyConfig(cache=str(Path(tempfile.mkdtemp()) / "latency.json"), threads=args.threads) if args.objective == "latency" else None,
    )
    result = compress(model, data, config, input_shape=shape, filter_fn=info.default_filter, reference={"top1": 0.0, "top5": 0.0})
    rep = result.report
    latency = {"batch_1": rep["latency"]["runtimes"]}
    runtimes = ["torch"] + (["onnxruntime"] if onnxruntime_available() else [])
    if args.throughput_batch:
        latency[f"batch_{args.throughput_batch}"] = {
            r: compare_latency(model, result.model, shape, r, batch=args.throughput_batch, threads=args.threads, rounds=3, repeats=3, warmup=1)
            for r in runtimes
        }
    out = {
        "model": f"{args.model} (random weights, random images)", "reduction_target": args.reduction,
        "flops_reduction": rep["flops"]["reduction"], "params_reduction": rep["params"]["reduction"],
        "images": args.images, "proxy_images": args.proxy_images, "candidates": rep["search"]["candidates"],
        "seconds": rep["seconds"], "peak_memory_mib": rep["peak_memory_mib"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "calibration": {k: v for k, v in rep.get("calibration", {}).items() if k != "prefix_fit"},
        "latency": latency, "plan": result.plan.to_dict(), "objective": args.objective, **stamp(args.threads),
    }
    if args.objective == "latency":
        out["predicted"], out["measured_budget"] = rep["latency"].get("predicted"), rep["latency"].get("measured_budget")
        for a in out["measured_budget"]["attempts"]:
            print(f"latency budget: table {100 * a['predicted_reduction']:.1f}%"
                  + (f", calibrated {100 * a['calibrated_reduction']:.1f}%" if "calibrated_reduction" in a else "")
                  + f", measured {100 * a['reduction']:.1f}%")
        print(f"met: {out['measured_budget']['met']}, kept attempt {out['measured_budget']['kept']}")
    print(f"{args.model}: FLOPs -{100 * out['flops_reduction']:.2f}%, {out['candidates']} candidates")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in rep["seconds"].items()))
    print("peak RSS (MiB) after each stage: " + ", ".join(f"{k} {v['rss']:.0f}" for k, v in rep["peak_memory_mib"].items()))
    print(f"calibration statistics: {out['calibration'].get('bytes', 0) / 2**20:.0f} MiB")
    for batch, per in latency.items():
        for r, x in per.items():
            print(f"latency {batch} {r}: {x['original_ms']:.1f} ms -> {x['compressed_ms']:.1f} ms (-{100 * x['reduction']:.1f}%)")
    print(f"wrote {write_json(args.out or result_path('imagenet_compress', f'{short_name(args.model)}_{args.reduction:g}' + ('_latency' if args.objective == 'latency' else '') + '.json'), out)}")


if __name__ == "__main__":
    main()
