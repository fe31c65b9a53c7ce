"""How much each target layer matters on its own: the top-1 drop when only that layer is replaced
by a low-rank version (the one-layer accuracy proxy, for a few fixed ranks).

    .venv/bin/python -m benchmarks.diagnostics.layer_sensitivity --model zoo:resnet18 --ranks 1 4

Each layer gets the spatial-separable split (kx1 first; 1x1 layers the plain SVD), ungrouped, at
each rank of --ranks; top-1 on --images held-out training images (drawn as the search's proxy
images are). Prints one row per layer and writes benchmarks/results/layer_sensitivity/<model>.json.
"""

from __future__ import annotations

import time

from benchmarks.common import parser, result_path, setup, short_name, stamp, write_json
from svdnas.data.datasets import load_data, search_subset
from svdnas.lowrank.decompose import decompose
from svdnas.lowrank.spec import LowRankSpec
from svdnas.models.build import build_model
from svdnas.search.accuracy_proxy import OneLayerEvaluator
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/layer_sensitivity/<model>.json)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args()
    setup(args)
    model, info = build_model(args.model)
    model.eval()
    data = load_data(args.data)
    images, _ = search_subset(data.train, args.images, args.seed + 1)
    infos = trace_layers(model, example_input(model, info.input_shape))
    targets, _ = select_targets(model, infos, info.default_filter)
    t0 = time.perf_counter()
    rows, original = [], None
    print(f"{'layer':24s} {'weight shape':>18s} " + " ".join(f"{'rank ' + str(r):>8s}" for r in args.ranks))
    for name in targets:
        layer = model.get_submodule(name)
        ev = OneLayerEvaluator(model, name, images, "cpu", original_top1=original)
        original = ev.original_top1
        kernel = tuple(getattr(layer, "kernel_size", (1, 1)))
        first = (kernel[0], 1) if kernel[0] > 1 else (1, 1)
        specs = [LowRankSpec(first, (1, 1), r) for r in args.ranks]
        drops = [original - a for a in ev.top1([decompose(layer, [s]) for s in specs])]
        rows.append({"layer": name, "weight_shape": list(layer.weight.shape), "drops_pp": dict(zip(map(str, args.ranks), drops))})
        print(f"{name:24s} {tuple(layer.weight.shape)!s:>18s} " + " ".join(f"{d:8.2f}" for d in drops), flush=True)
    print(f"original top-1 {original:.2f}% on {args.images} images; {time.perf_counter() - t0:.0f}s")
    out = write_json(args.out or result_path("layer_sensitivity", f"{short_name(args.model)}.json"), {
        "model": args.model, "images": args.images, "ranks": args.ranks, "original_top1": original, "rows": rows,
        **stamp(args.threads),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
