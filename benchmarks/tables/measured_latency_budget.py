"""Latency budgets met on the whole model as it runs: ``--objective latency`` at several reductions
beside ``--objective flops``, every plan's latency measured end to end in the deployment runtime.

    .venv/bin/python -m benchmarks.tables.measured_latency_budget --model zoo:resnet18 \\
        --reductions 0.1 0.2 0.3 0.4 0.5 --flops-reductions 0.4 0.5 0.6 --runtime onnxruntime

For each latency run: the lookup table's predicted reduction of the search's first plan (the sum of
per-layer PyTorch timings) against its measured reduction, the repairs the run made and the
measured reduction of the plan it kept (``report.json`` ``latency.measured_budget``), then the
report's own, separate measurement of the delivered model (batch 1, ``--threads``) and its top-1
drop on the whole test split. The FLOPs runs give, beside them, the top-1 drop of plans of about the
same measured latency. One process, runs one after another, one shared lookup table (a fresh file,
so that building it is timed). Writes benchmarks/results/measured_latency_budget/<model>.json.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.table import LatencyConfig
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.errors import BudgetError
from svdnas.models.build import build_model
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/measured_latency_budget/<model>.json)")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--flops-reductions", type=float, nargs="*", default=[0.4, 0.5, 0.6])
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "torch"))
    args = p.parse_args()
    setup(args)
    model, info = build_model(args.model)
    data = load_data(args.data)
    reference = evaluate(model, data.test)
    cache = str(Path(tempfile.mkdtemp()) / "latency.json")
    rows = []
    for objective, reductions in (("latency", args.reductions), ("flops", args.flops_reductions)):
        for r in reductions:
            config = CompressConfig(reduction=r, objective=objective, runtime=args.runtime,
                                    latency=LatencyConfig(cache=cache, threads=args.threads) if objective == "latency" else None)
            load = os.getloadavg()[0]
            try:
                rep = compress(model, data, config, input_shape=info.input_shape, filter_fn=info.default_filter, seed=args.seed,
                               reference=reference).report
            except BudgetError as e:
                print(f"{objective} R={r}: {e}", flush=True)
                rows.append({"objective": objective, "reduction": r, "error": str(e)})
                continue
            lat = rep["latency"]
            row = {"objective": objective, "reduction": r, "flops_reduction": rep["flops"]["reduction"], "drop_pp": rep["top1"]["drop_pp"],
                   "measured": lat["reduction"], "runtimes": lat["runtimes"], "seconds": rep["seconds"], "load_average": load}
            if objective == "latency":
                budget, total = lat["measured_budget"], lat["predicted"]["original_ms"]
                first, kept = budget["attempts"][0], budget["attempts"][budget["kept"]]
                row |= {"predicted_first": 1 - first["predicted_ms"] / total, "measured_first": first["reduction"],
                        "predicted_kept": 1 - kept["predicted_ms"] / total, "measured_kept": kept["reduction"],
                        "met": budget["met"], "repairs": budget["repairs"], "table": lat["predicted"]["table"]}
                # each repair's prediction by the table calibrated on the attempt before it
                row["calibrated"] = [{"predicted": a["calibrated_reduction"], "measured": a["reduction"]}
                                     for a in budget["attempts"] if "calibrated_reduction" in a]
                row["calibrated_kept"] = kept.get("calibrated_reduction")
            rows.append(row)
            print(f"{objective} R={r}: measured {-100 * row['measured']:+.1f}% in {args.runtime}, FLOPs -{100 * row['flops_reduction']:.1f}%, "
                  f"drop {row['drop_pp']:.2f} pp" + (f", met {row['met']} after {row['repairs']} repairs" if objective == "latency" else ""),
                  flush=True)

    def pc(x: float) -> str:
        return f"{100 * x:.1f}%"

    print(f"\n{args.model}, latency in {args.runtime} at batch 1, {args.threads} threads; original top-1 {reference['top1']:.2f}")
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["objective"], f"{row['reduction']:g}", "not met: " + row["error"], "", "", "", "", "", "", ""])
        elif row["objective"] == "latency":
            cal = "" if row["calibrated_kept"] is None else pc(row["calibrated_kept"])
            table.append(["latency", f"{row['reduction']:g}", pc(row["predicted_first"]), pc(row["measured_first"]), str(row["repairs"]),
                          cal, pc(row["measured_kept"]), pc(row["measured"]), pc(row["flops_reduction"]), f"{row['drop_pp']:.2f}"])
        else:
            table.append(["flops", f"{row['reduction']:g}", "", "", "", "", "", pc(row["measured"]), pc(row["flops_reduction"]), f"{row['drop_pp']:.2f}"])
    print(markdown_table(["objective", "R", "table's prediction, first plan", "measured, first plan", "repairs", "calibrated prediction, kept plan", "measured, kept plan",
                          "measured again (report)", "FLOPs reduction", "top-1 drop (pp)"], table))
    calibrated = [c for row in rows for c in row.get("calibrated", [])]
    if calibrated:
        errors = [abs(c["predicted"] - c["measured"]) for c in calibrated]
        print(f"table's prediction calibrated on the attempt before: {len(errors)} repairs, absolute error of the reduction "
              f"mean {sum(errors) / len(errors):.3f}, largest {max(errors):.3f}")
    out = write_json(args.out or result_path("measured_latency_budget", f"{short_name(args.model)}.json"),
                     {"model": args.model, "runtime": args.runtime, "original_top1": reference["top1"], "rows": rows, **stamp(args.threads)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
