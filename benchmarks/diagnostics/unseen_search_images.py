"""Does the search generalise worse because its images were seen in training?

The zoo's models were trained on the whole Fashion-MNIST training split, so every image ``compress``
searches on (and runs its proxies on) is one the original model has fitted; the paper searched on
ImageNet's validation images, which its models had never seen. This benchmark splits the test
split in two halves: it compresses the model with svdnas twice, once as shipped (search and proxy
images from the training split) and once searching on images of the first half (never seen by the
original), and compresses it with ALDS (data-free). All three are scored on the second half only.
A diagnosis, not a way to use the tool: a user's test split is not for searching.

    .venv/bin/python -m benchmarks.diagnostics.unseen_search_images --model zoo:efficientnet_b0 --reduction 0.1
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.common import markdown_table, parser, result_path, setup, short_name, stamp, write_json
from svdnas.data.datasets import DataBundle, load_data
from svdnas.data.evaluate import evaluate
from svdnas.models.build import build_model
from svdnas.pipeline.baseline import run_baseline
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig


def main() -> None:
    p = parser(__doc__, model="zoo:efficientnet_b0", threads=1, seed=None,
               out="JSON path (default benchmarks/results/unseen_search_images/<model>_r<R>.json)")
    p.add_argument("--reduction", type=float, default=0.1)
    args = p.parse_args()
    setup(args, manual_seed=0)
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
        result = compress(copy.deepcopy(model), bundle, CompressConfig(reduction=args.reduction), input_shape=data.input_shape,
                          filter_fn=info.default_filter, seed=0)
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
    print(markdown_table(["method", "top-1", "drop (pp)", "FLOPs reduction"],
                         [[r["method"], f"{r['top1']:.2f}", f"{r['drop_pp']:.2f}", f"{100 * r['flops_reduction']:.1f}%"] for r in rows]))
    out = write_json(args.out or result_path("unseen_search_images", f"{short_name(args.model)}_r{args.reduction}.json"), {
        "benchmark": "unseen_search", "model": args.model, "reduction": args.reduction, **stamp(args.threads),
        "scored_images": len(second), "original_top1": original, "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
