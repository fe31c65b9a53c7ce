"""How many alternating least-squares steps the prefix fit needs: ``compress`` with every default but
``Derivation.prefix_refit_iters`` (the steps of the exact refit of the layers whose pooled fit is an
approximation), at each budget, the settings in turns, post-training on the whole test split.

    .venv/bin/python -m benchmarks.diagnostics.prefix_refit_iters --model zoo:resnet18 --reductions 0.4 0.5 0.6 0.7

The steps are set on the job's derivation as the statistics stage returns it (they are not a
``compress`` option). The plan is the same for every setting at a budget (the search runs before the
fit), unless timing changes the candidates offered; the JSON keeps each run's plan. Prints the drop
and the prefix fit's seconds per budget and setting; writes
benchmarks/results/prefix_refit_iters/<model>.json.
"""

from __future__ import annotations

from benchmarks.common import markdown_table, model_and_data, parser, result_path, setup, short_name, stamp, write_json
from svdnas.data.evaluate import evaluate
from svdnas.pipeline import stages
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig


def with_steps(steps: int):
    """``stages.calibrate`` whose derivation fits the prefix with ``steps`` alternating steps."""
    real = stages.calibrate

    def calibrate(*args, **kwargs):
        derivation = real(*args, **kwargs)
        derivation.prefix_refit_iters = steps
        return derivation

    return calibrate


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/prefix_refit_iters/<model>.json)")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 2])
    args = p.parse_args()
    setup(args)
    model, info, data = model_and_data(args)
    reference = evaluate(model, data.test)
    real = stages.calibrate
    rows = []
    try:
        for reduction in args.reductions:
            for steps in args.steps:
                stages.calibrate = with_steps(steps)
                result = compress(model, data, CompressConfig(reduction=reduction), input_shape=info.input_shape,
                                  filter_fn=info.default_filter, seed=args.seed, reference=reference)
                rep = result.report
                rows.append({"reduction_target": reduction, "steps": steps, "drop_pp": rep["top1"]["drop_pp"],
                             "flops_reduction": rep["flops"]["reduction"], "seconds": rep["seconds"], "plan": result.plan.to_dict()})
                print(f"R={reduction:.2f} steps {steps}  drop {rep['top1']['drop_pp']:.2f}pp  FLOPs -{100 * rep['flops']['reduction']:.2f}%  "
                      f"prefix fit {rep['seconds'].get('prefix_fit', 0.0):.1f}s  compress {rep['seconds']['total']:.1f}s", flush=True)
    finally:
        stages.calibrate = real
    body = []
    for reduction in args.reductions:
        mine = [r for r in rows if r["reduction_target"] == reduction]
        same = len({str(r["plan"]) for r in mine}) == 1
        body.append([f"{reduction:g}"] + [f"{r['drop_pp']:.2f} ({r['seconds'].get('prefix_fit', 0.0):.1f} s)" for r in mine]
                    + ["yes" if same else "no"])
    print()
    print(f"`{info.spec}`, top-1 drop (pp) and the prefix fit's seconds, {stamp(args.threads)['date']}")
    print(markdown_table(["R"] + [f"{s} steps" for s in args.steps] + ["same plan"], body))
    out = args.out or result_path("prefix_refit_iters", f"{short_name(info.spec)}.json")
    write_json(out, {"meta": {"model": info.spec, "data": args.data, "original_top1": reference["top1"], **stamp(args.threads)},
                     "rows": rows})


if __name__ == "__main__":
    main()
