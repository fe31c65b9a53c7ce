"""One search epoch of an ImageNet-size ResNet-18 (random weights, 224x224, random images) on this
machine: does it fit in memory, and how long does it take?

    .venv/bin/python -m benchmarks.diagnostics.imagenet_search_epoch [--images 256] [--batch 32] [--max-groups 1]

Prints time per stage and the process's peak resident memory; writes JSON.
"""

from __future__ import annotations

import platform
import resource
import time
from datetime import date

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import parser, result_path, setup, write_json
from svdnas.cost.counting import model_macs
from svdnas.models.build import build_model
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig, build_supernet, grid_candidates, search, window_dtype
from svdnas.search.candidates import limit_groups
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = parser(__doc__, model=None, data=None, seed=None, out="JSON to write (default benchmarks/results/imagenet_search_epoch/resnet18_imagenet.json)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-groups", type=int, default=1)
    p.add_argument("--reduction", type=float, default=0.6)
    args = p.parse_args()
    setup(args, manual_seed=0)
    stages = {}
    t0 = time.perf_counter()
    model, info = build_model("zoo:resnet18_imagenet")
    shape = info.input_shape
    infos = trace_layers(model, example_input(model, shape))
    targets, _ = select_targets(model, infos, "all-but-first")
    fractions = CompressConfig(reduction=args.reduction).fractions()
    candidates = {n: limit_groups(grid_candidates(n, model.get_submodule(n), infos[n].input_hw, fractions), args.max_groups) for n in targets}
    total = float(model_macs(model, shape))
    stages["candidates_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    net, layers = build_supernet(model, candidates, window_dtype=window_dtype("auto", "cpu"))
    stages["build_s"] = time.perf_counter() - t0
    data = TensorDataset(torch.randn(args.images, *shape), torch.randint(0, 1000, (args.images,)))
    costs = {n: c.cost("flops") for n, c in candidates.items()}
    t0 = time.perf_counter()
    search(net, layers, data, SearchConfig(epochs=1, batch_size=args.batch, target=1 - args.reduction), costs, total)
    stages["search_epoch_s"] = time.perf_counter() - t0
    result = {
        "model": "zoo:resnet18_imagenet (random weights)", "images": args.images, "batch": args.batch,
        "candidates": sum(len(c) - 1 for c in candidates.values()), "max_groups": args.max_groups, **stages,
        "peak_rss_gib": peak_gib(), "threads": args.threads, "machine": platform.machine(), "date": date.today().isoformat(),
    }
    for k, v in result.items():
        print(f"{k:16s} {v:.2f}" if isinstance(v, float) else f"{k:16s} {v}")
    write_json(args.out or result_path("imagenet_search_epoch", "resnet18_imagenet.json"), result)


if __name__ == "__main__":
    main()
