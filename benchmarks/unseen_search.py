"""Does the search generalise worse because its images were seen in training? (issue 6)

The zoo's models were trained on the whole Fashion-MNIST training split, so every image ``compress``
searches on (and runs its proxies on) is one the original model has fitted; the paper searched on
ImageNet's validation images, which its models had never seen. This benchmark splits the test
split in two halves: it compresses the model with svdnas twice, once as shipped (search and proxy
images from the training split) and once searching on images of the first half (never seen by the
original), and compresses it with ALDS (data-free). All three are scored on the second half only.
A diagnosis, not a way to use the tool: a user's test split is not for searching.

    .venv/bin/python benchmarks/unseen_search.py --model zoo:efficientnet_b0 --reduction 0.1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _common import stamp

from svdnas.data.datasets import DataBundle, load_data
from svdnas.data.evaluate import evaluate
from svdnas.models.build import build_model
from svdnas.pipeline.baseline import run_baseline
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zoo:efficientnet_b0")
    p.add_argument("--data", default="fmnist")
    p.add_argument("--reduction", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/unseen_search_<model>_r<R>.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data(args.data)
    n = len(data.test)  # type: ignore[arg-type]
    first = torch.utils.data.Subset(data.test, range(n // 2))
    second = torch.utils.data.Subset(data.test, range(n // 2, n))
    scored = DataBundle(data.train, second, data.input_shape, data.num_classes, data.name)  # as shipped: search on train
    unseen = DataBundle(first, second, data.input_shape, data.num_classes, data.name + "[test first half]")
    model, info = build_model(args.model)
    model.eval()
    original = evaluate(model, second)["top1"]
    rows = []
    for name, bundle in (("svdnas, search on training images (as shipped)", scored), ("svdnas, search on unseen images", unseen)):
        t0 = time.perf_counter()
        result = compress(copy.deepcopy(model), bundle, CompressConfig(reduction=args.reduction), data.input_shape, info.default_filter, seed=0)
        r = result.report
        rows.append({"method": name, "top1": r["top1"]["compressed"], "drop_pp": original - r["top1"]["compressed"],
                     "flops_reduction": r["flops"]["reduction"], "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    _, _, r = run_baseline("alds", copy.deepcopy(model), scored, args.reduction, data.input_shape, info.default_filter)
    rows.append({"method": "alds (data-free)", "top1": r["top1"]["compressed"], "drop_pp": original - r["top1"]["compressed"],
                 "flops_reduction": r["flops"]["reduction"], "seconds": time.perf_counter() - t0})
    print(rows[-1], flush=True)
    print(f"\n{args.model}, R = {args.reduction}, scored on the second half of the test split ({len(second)} images), original {original:.2f}")
    print("| method | top-1 | drop (pp) | FLOPs reduction |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['method']} | {row['top1']:.2f} | {row['drop_pp']:.2f} | {100 * row['flops_reduction']:.1f}% |")
    out = Path(args.out or f"benchmarks/results/unseen_search_{args.model.split(':')[-1]}_r{args.reduction}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "unseen_search", "model": args.model, "reduction": args.reduction, **stamp(args.threads),
                               "scored_images": len(second), "original_top1": original, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
