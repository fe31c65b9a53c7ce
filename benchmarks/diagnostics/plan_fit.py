"""How well compressed models fit the images the search learned from, beside the test set: top-1
and mean cross-entropy of the original and of each run directory on the search images and on the
proxy images that ``compress`` draws (same counts and seed as its defaults), with each run's test
top-1 from its report. Tells a search that does not optimise its objective from one whose plan
does not carry over to the test set (EfficientNet-B0 against ALDS).

    .venv/bin/python -m benchmarks.diagnostics.plan_fit zoo:efficientnet_b0 runs/svdnas runs/alds
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import svdnas
from benchmarks.common import parser, setup
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import batches
from svdnas.models.build import build_model
from svdnas.pipeline.config import CompressConfig
from svdnas.pipeline.images import real_search_images


@torch.no_grad()
def fit(model: torch.nn.Module, dataset) -> tuple[float, float]:
    """Top-1 (%) and mean cross-entropy of ``model`` on ``dataset``."""
    model.eval()
    correct, ce, n = 0, 0.0, 0
    for x, y in batches(dataset, 250):
        z = model(x)
        correct += int((z.argmax(1) == y).sum())
        ce += float(F.cross_entropy(z, y, reduction="sum"))
        n += len(y)
    return 100 * correct / n, ce / n


def main() -> None:
    p = parser(__doc__, model=None, seed=None)
    p.add_argument("model", help="the original model's spec")
    p.add_argument("runs", nargs="+", type=Path, help="run directories written by compress or baseline")
    p.add_argument("--seed", type=int, default=0, help="the seed the runs were made with")
    args = p.parse_args()
    setup(args)
    data = load_data(args.data)
    search, proxy = real_search_images(data, CompressConfig(reduction=0.5), args.seed)  # the subsets depend on the counts and seed only
    rows = [("original", build_model(args.model)[0], None)]
    for run in args.runs:
        rows.append((run.name, svdnas.load(str(run)), json.loads((run / "report.json").read_text())["top1"]))
    print(f"| plan | test top-1 (drop) | search images ({len(search)}): top-1, CE | proxy images ({len(proxy)}): top-1, CE |")
    print("| --- | ---: | ---: | ---: |")
    for name, model, top1 in rows:
        test = f"{top1['compressed']:.2f} ({top1['drop_pp']:.2f} pp)" if top1 else "-"
        (s1, sce), (p1, pce) = fit(model, search), fit(model, proxy)
        print(f"| {name} | {test} | {s1:.2f}, {sce:.3f} | {p1:.2f}, {pce:.3f} |")


if __name__ == "__main__":
    main()
