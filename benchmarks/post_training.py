"""Post-training comparison (Table 1 / issue 7 analogue): svdnas beside every baseline, same model,
data, budget and test images, in one run.

    .venv/bin/python benchmarks/post_training.py --model zoo:resnet18 --reductions 0.4 0.5 0.6 0.7

Baselines: uniform and energy with every kernel split, and data-free LR-S2. Prints one table per
run, writes benchmarks/results/post_training_<model>.json and a plot of top-1 drop against FLOPs
reduction.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from svdnas.baselines import SPLITS, run_baseline
from svdnas.data import load_data
from svdnas.models import build_model
from svdnas.pipeline import CompressConfig, compress
from svdnas.search import SearchConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="zoo:resnet18")
    p.add_argument("--data", default="fmnist")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--families", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, info = build_model(args.model)
    data = load_data(args.data)
    from svdnas.evaluate import evaluate

    reference = evaluate(model, data.test)  # the original's accuracy, measured once for every row
    methods = ["svdnas"] + [f"uniform-{s}" for s in SPLITS] + [f"energy-{s}" for s in SPLITS] + ["lrs2", "alds", "fgroup"]
    rows = []
    for r in args.reductions:
        for method in methods:
            t0 = time.perf_counter()
            if method == "svdnas":
                config = CompressConfig(reduction=r, families=args.families, search=SearchConfig(epochs=args.epochs, target=1 - r))
                rep = compress(model, data, config, info.input_shape, info.default_filter, seed=args.seed, model_spec=info.spec, reference=reference).report
            else:
                name, _, split = method.partition("-")
                _, _, rep = run_baseline(name, model, data, r, info.input_shape, info.default_filter, split or "kx1", seed=args.seed,
                                        model_spec=info.spec, reference=reference)
            rows.append({
                "reduction_target": r, "method": method, "flops_reduction": rep["flops"]["reduction"],
                "params_reduction": rep["params"]["reduction"], "top1": rep["top1"]["compressed"],
                "drop_pp": rep["top1"]["drop_pp"], "original_top1": rep["top1"]["original"], "seconds": time.perf_counter() - t0,
            })
            print(f"R={r:.2f} {method:14s} FLOPs -{100 * rows[-1]['flops_reduction']:6.2f}%  top-1 {rows[-1]['top1']:6.2f}  drop {rows[-1]['drop_pp']:6.2f}pp  ({rows[-1]['seconds']:.0f}s)", flush=True)
    print()
    print(f"{info.spec}, original top-1 {rows[0]['original_top1']:.2f}%: top-1 drop (pp) at each FLOPs reduction target")
    print(f"{'method':14s} " + " ".join(f"R={r:<5}" for r in args.reductions))
    for method in methods:
        cells = [next(x for x in rows if x["method"] == method and x["reduction_target"] == r) for r in args.reductions]
        print(f"{method:14s} " + " ".join(f"{c['drop_pp']:7.2f}" for c in cells))
    out = Path(args.out or f"benchmarks/results/post_training_{info.spec.replace(':', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": info.spec, "data": args.data, "epochs": args.epochs, "families": args.families, "seed": args.seed,
            "threads": args.threads, "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "date": date.today().isoformat()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            pts = sorted((x["flops_reduction"], x["drop_pp"]) for x in rows if x["method"] == method)
            style = {"lw": 2.5, "color": "black", "marker": "o"} if method == "svdnas" else {"lw": 1, "marker": "."}
            ax.plot([100 * a for a, _ in pts], [b for _, b in pts], label=method, **style)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel("top-1 drop (pp), post-training")
        ax.set_title(f"{info.spec} on {args.data}")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
