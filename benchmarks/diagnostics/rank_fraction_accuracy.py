"""How far a zoo model survives one rank fraction in every target layer (and that full rank is exact).

    .venv/bin/python -m benchmarks.diagnostics.rank_fraction_accuracy [--model zoo:resnet18] [--images 2000]

Every target layer gets the same split at the same fraction of its full rank; prints top-1 on the
first N test images per fraction.
"""

from __future__ import annotations

import copy

from torch.utils.data import Subset

from benchmarks.common import parser, setup
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.spec import LowRankSpec, family_max_rank
from svdnas.models.build import build_model
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers


def main() -> None:
    p = parser(__doc__, seed=None)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    args = p.parse_args()
    setup(args)
    model, info = build_model(args.model)
    data = load_data(args.data)
    sub = Subset(data.test, list(range(args.images)))
    print(f"{args.model}: original top-1 {evaluate(model, sub)['top1']:.2f} on {args.images} test images")
    infos = trace_layers(model, example_input(model, info.input_shape))
    targets, _ = select_targets(model, infos, info.default_filter)
    for frac in args.fractions:
        plan = Plan()
        for name in targets:
            w = model.get_submodule(name).weight
            kernel = tuple(w.shape[2:]) if w.dim() == 4 else (1, 1)
            spec = LowRankSpec((kernel[0], 1), (1, 1), 1)
            full = family_max_rank(spec, w.shape[0], w.shape[1], kernel)
            plan.layers[name] = [spec.with_rank(max(1, int(frac * full)))]
        acc = evaluate(apply_plan(copy.deepcopy(model), plan), sub)["top1"]
        print(f"rank {frac:.2f} x full rank, (k,1)-first split, every target layer: top-1 {acc:.2f}")


if __name__ == "__main__":
    main()
