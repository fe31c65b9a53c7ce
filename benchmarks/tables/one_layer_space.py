"""One layer's whole LR-space (the paper's Figure 3 analogue): every candidate's top-1
with only that layer compressed, against its FLOPs, and how well two cheap proxies predict it.

    .venv/bin/python -m benchmarks.tables.one_layer_space --model zoo:resnet18 --layer layer2.0.conv2

For every candidate of the layer (every kernel split, grouping and rank of ``svdnas.space``):
  * top-1 on --images held-out training images with that layer alone replaced (the one-layer
    accuracy proxy of ``svdnas.search.accuracy_proxy``, run exhaustively);
  * the relative squared error of its reconstructed weight (the proxy the paper argues against);
  * the relative squared error of the layer's output on the same images (svdnas's family proxy).
Prints the Spearman rank correlation of each proxy with the top-1 drop, writes
benchmarks/results/one_layer_space/<model>_<layer>.json and a two-panel figure (.png beside it): the Pareto front of top-1
against the layer's MACs coloured by kernel split, and each proxy against the drop.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.counting import layer_cost
from svdnas.data.datasets import load_data, search_subset
from svdnas.lowrank.decompose import decompose
from svdnas.lowrank.functional import branches_weight
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.space import enumerate_space
from svdnas.models.build import build_model
from svdnas.search.accuracy_proxy import OneLayerEvaluator
from svdnas.search.output_proxy import capture_inputs
from svdnas.surgery.trace import example_input, trace_layers


def ranks(xs: list[float]) -> list[float]:
    """Ranks from 1, ties given their average rank."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def split_name(spec) -> str:
    return {(1, 1): "1x1 first", (3, 3): "kxk first", (3, 1): "kx1 first", (1, 3): "1xk first"}.get(tuple(spec.first_kernel), str(spec.first_kernel))


def grouping_name(spec) -> str:
    g1, g2 = spec.groups
    return "ungrouped" if g1 == g2 == 1 else (f"first g{g1}" if g1 > 1 else f"second g{g2}")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not beaten by a cheaper one: top-1 rising with cost."""
    front, best = [], float("-inf")
    for cost, acc in sorted(points):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def figure(rows: list[dict], original_top1: float, layer: str, rho: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"ungrouped": "o", "first": "^", "second": "v"}
    for split in sorted({r["split"] for r in rows}):
        for kind, m in markers.items():
            pts = [r for r in rows if r["split"] == split and r["grouping"].startswith(kind)]
            if pts:
                a.scatter([r["macs_fraction"] for r in pts], [r["top1"] for r in pts], s=6, marker=m, alpha=0.5,
                          label=f"{split}, {kind}", color=plt.cm.tab10(sorted({r['split'] for r in rows}).index(split)))
    front = pareto([(r["macs_fraction"], r["top1"]) for r in rows])
    a.plot(*zip(*front), color="k", lw=1, label="Pareto front")
    a.axhline(original_top1, color="grey", ls=":", lw=1)
    a.set_xlabel(f"{layer}: MACs kept (fraction of the original layer)")
    a.set_ylabel("top-1 (%), only this layer compressed")
    a.set_xlim(0, 1.05)
    a.legend(fontsize=6, ncol=2, markerscale=2)
    drops = [r["drop_pp"] for r in rows]
    b.scatter([r["weight_error"] for r in rows], drops, s=6, alpha=0.4, label=f"weight error (Spearman {rho['weight_error']:.2f})")
    b.scatter([r["output_error"] for r in rows], drops, s=6, alpha=0.4, label=f"output error (Spearman {rho['output_error']:.2f})")
    b.set_xscale("log")
    b.set_xlabel("relative squared error")
    b.set_ylabel("top-1 drop (pp)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__, out="JSON to write, the figure beside it (default benchmarks/results/one_layer_space/<model>_<layer>.json)")
    p.add_argument("--layer", default="layer2.0.conv2")
    p.add_argument("--images", type=int, default=256, help="held-out training images (drawn as the proxy's are)")
    p.add_argument("--chunk", type=int, default=32, help="candidates evaluated per recorded pass")
    args = p.parse_args()
    setup(args)
    model, _ = build_model(args.model)
    model.eval()
    data = load_data(args.data)
    images, _ = search_subset(data.train, args.images, args.seed + 1)
    shape = tuple(data.input_shape)
    layer = model.get_submodule(args.layer)
    hw = trace_layers(model, example_input(model, shape))[args.layer].input_hw
    specs = list(enumerate_space(layer))
    macs0 = layer_cost(layer, hw)[0]
    print(f"{args.model} {args.layer}: {len(specs)} candidates, {args.images} images", flush=True)

    t0 = time.perf_counter()
    ev = OneLayerEvaluator(model, args.layer, images, "cpu")
    x = capture_inputs(model, [args.layer], images, "cpu")[args.layer]
    with torch.no_grad():
        y = layer(x)
    weight = conv_weight(layer)
    rows = []
    for start in range(0, len(specs), args.chunk):
        chunk = specs[start : start + args.chunk]
        blocks = [decompose(layer, [s]).eval() for s in chunk]
        for spec, block, top1 in zip(chunk, blocks, ev.top1(blocks)):
            with torch.no_grad():
                w_err = float((branches_weight(weight, [spec]) - weight).pow(2).sum() / weight.pow(2).sum())
                o_err = float((block(x) - y).pow(2).sum() / y.pow(2).sum())
            rows.append({
                "spec": spec.to_dict(), "split": split_name(spec), "grouping": grouping_name(spec),
                "macs_fraction": layer_cost(layer, hw, [spec])[0] / macs0, "top1": top1, "drop_pp": ev.original_top1 - top1,
                "weight_error": w_err, "output_error": o_err,
            })
        print(f"  {len(rows)}/{len(specs)} candidates, {time.perf_counter() - t0:.0f}s", flush=True)
    seconds = time.perf_counter() - t0

    drops = [r["drop_pp"] for r in rows]
    rho = {k: spearman([r[k] for r in rows], drops) for k in ("weight_error", "output_error")}
    # the same question where it matters: candidates that keep at most half the layer's MACs
    cheap = [r for r in rows if r["macs_fraction"] <= 0.5]
    rho_cheap = {k: spearman([r[k] for r in cheap], [r["drop_pp"] for r in cheap]) for k in rho}
    front = pareto([(r["macs_fraction"], r["top1"]) for r in rows])
    on_front = {(r["macs_fraction"], r["top1"]): r for r in rows}
    front_splits = sorted({on_front[pt]["split"] + ", " + on_front[pt]["grouping"] for pt in front})
    print(f"\noriginal top-1 on these images {ev.original_top1:.2f}%; {len(rows)} candidates in {seconds:.0f}s "
          f"({1000 * seconds / len(rows):.0f} ms each, prefix replayed: {bool(ev.replay)})")
    print(f"{'proxy':14s} {'Spearman vs drop':>17s} {'(MACs <= 50%)':>14s}")
    for k, value in rho.items():
        print(f"{k:14s} {value:17.3f} {rho_cheap[k]:14.3f}")
    print(f"Pareto front: {len(front)} points, from {', '.join(front_splits)}")
    for frac in (0.1, 0.2, 0.3, 0.4, 0.5):
        best = max((r for r in rows if r["macs_fraction"] <= frac), key=lambda r: r["top1"], default=None)
        if best is not None:
            print(f"  best at <= {frac:.0%} MACs: top-1 {best['top1']:.2f} ({best['split']}, {best['grouping']}, rank {best['spec']['rank']})")

    name = f"{short_name(args.model)}_{args.layer}"
    path = Path(args.out or result_path("one_layer_space", f"{name}.json"))
    fig = path.with_suffix(".png")
    fig.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, ev.original_top1, args.layer, rho, fig)
    result = {
        "benchmark": "one_layer_space", "model": args.model, "layer": args.layer, "images": args.images,
        **stamp(args.threads), "seconds": seconds, "original_top1": ev.original_top1,
        "spearman": rho, "spearman_macs_le_half": rho_cheap, "pareto": front, "candidates": rows,
    }
    write_json(path, result)
    print(f"wrote {path} and {fig}")


if __name__ == "__main__":
    main()
