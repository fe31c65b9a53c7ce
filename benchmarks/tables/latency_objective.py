"""The latency objective beside the FLOPs objective (the paper's Table 4, on this machine's CPU).

    .venv/bin/python -m benchmarks.tables.latency_objective --model zoo:resnet18 --reduction 0.4 [--batches 1 32]

Compresses the model at the same reduction R with ``--objective flops`` and ``--objective latency``
(searched at each batch of ``--search-batches``), same data, search settings and seed; then, for
every plan and every batch of ``--batches``:

- predicted latency reduction: the lookup table's latencies of the plan's layers (the chosen
  candidates measured exactly), plus the rest of the model (measured whole model minus the table's
  target layers), against the original;
- measured latency reduction: the whole compressed model against the original, end to end,
  interleaved (``--rounds`` rounds of ``--repeats`` runs each, median of the round medians).

Prints one table, writes ``benchmarks/results/latency_objective/<model>.json`` with the time the
lookup table took. The table starts empty (a fresh file in a temporary folder) unless
``--latency-cache`` names one, so that its build time is measured from scratch. Timings on a
machine shared with other jobs are noisy: the JSON records the load average before and after.

Latency falls more slowly than FLOPs: on ``zoo:resnet18`` (28x28 inputs, batch 1, one thread) the
fastest candidate of every target layer together remove about 55% of the measured latency (one
table measured at load average 3.4 on 2 cores), so R well above 0.5 cannot be met on latency there.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks.common import parser, result_path, setup, write_json
from svdnas.cost.table import LatencyConfig, LatencyTable
from svdnas.cost.timer import torch_latency
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.errors import BudgetError
from svdnas.models.build import build_model
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig
from svdnas.surgery.trace import example_input, trace_layers


def pct(reduction: float) -> str:
    """A reduction as a signed change: 0.3 -> '-30.0%', -0.1 -> '+10.0%'."""
    return f"{-100 * reduction:+.1f}%"


def predicted_reduction(model, infos, plan, table: LatencyTable, whole_ms: float) -> float:
    """1 - predicted latency of ``plan`` / the original's, from the table (exact entries of the chosen candidates)."""
    before = after = 0.0
    for name, specs in plan.layers.items():
        layer, hw = model.get_submodule(name), infos[name].input_hw
        before += table.layer(layer, hw)
        after += table.layer(layer, hw, specs)
    rest = max(whole_ms - before, 0.0)
    return 1 - (rest + after) / (rest + before)


def measured_reduction(original, compressed, shape, batch: int, rounds: int, repeats: int) -> dict[str, float]:
    """End-to-end latencies (ms) of both models, interleaved so that load hits both alike."""
    runs: dict[str, list[float]] = {"original": [], "compressed": []}
    for _ in range(rounds):
        for key, m in (("original", original), ("compressed", compressed)):
            runs[key].append(torch_latency(m, shape, batch=batch, warmup=3, repeats=repeats)["median_ms"])
    before, after = statistics.median(runs["original"]), statistics.median(runs["compressed"])
    return {"original_ms": before, "compressed_ms": after, "reduction": 1 - after / before}


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/latency_objective/<model>.json)")
    p.add_argument("--reduction", type=float, default=0.4, help="the same R for both objectives (default 0.4)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batches the plans are timed at")
    p.add_argument("--search-batches", type=int, nargs="+", default=[1], help="batches the latency objective searches at")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--search-images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--latency-cache", default=None, help="table file to use (default: a fresh one, to time building it)")
    args = p.parse_args()
    setup(args)
    load_before = os.getloadavg()
    model, info = build_model(args.model)
    model.eval()
    data = load_data(args.data)
    shape = info.input_shape or data.input_shape
    infos = trace_layers(model, example_input(model, shape))
    reference = evaluate(model, data.test)
    tmp = tempfile.TemporaryDirectory()
    cache = args.latency_cache or str(Path(tmp.name) / "latency.json")

    runs = [("flops", None)] + [("latency", b) for b in args.search_batches]
    rows = []
    for objective, batch in runs:
        t0 = time.perf_counter()
        config = CompressConfig(
            reduction=args.reduction, objective=objective, search_images=args.search_images, latency=LatencyConfig(batch=batch, cache=cache) if batch else None,
            search=SearchConfig(epochs=args.epochs, target=1 - args.reduction),
        )
        name = objective if batch is None else f"latency@{batch}"
        try:
            result = compress(model, data, config, input_shape=shape, filter_fn=info.default_filter, seed=args.seed, reference=reference)
        except BudgetError as e:
            print(f"{name:11s} {e}", flush=True)
            rows.append({"objective": name, "error": str(e)})
            continue
        rep = result.report
        row = {
            "objective": name, "flops_reduction": rep["flops"]["reduction"],
            "params_reduction": rep["params"]["reduction"], "top1": rep["top1"]["compressed"], "drop_pp": rep["top1"]["drop_pp"],
            "compress_seconds": time.perf_counter() - t0, "plan": result.plan.to_dict(),
        }
        if batch is not None:
            pred = rep["latency"]["predicted"]
            row["search_prediction"] = {"batch": batch, "reduction": pred["reduction"], "whole_model_ms": pred["whole_model_ms"]}
            row["latency_table"] = {**pred["table"], "seconds": rep["seconds"]["latency_table"]}
        for b in args.batches:
            table = LatencyTable("cpu", LatencyConfig(batch=b, cache=cache))
            whole = table.model(model, shape)
            row[f"predicted_b{b}"] = predicted_reduction(model, infos, result.plan, table, whole)
            table.save()
            row[f"measured_b{b}"] = measured_reduction(model, result.model, shape, b, args.rounds, args.repeats)
        rows.append(row)
        lat = "  ".join(f"b{b}: predicted {pct(row[f'predicted_b{b}'])} measured {pct(row[f'measured_b{b}']['reduction'])}" for b in args.batches)
        print(f"{name:11s} FLOPs {pct(row['flops_reduction'])}  latency {lat}  top-1 drop {row['drop_pp']:.2f}pp  ({row['compress_seconds']:.0f}s)", flush=True)

    print()
    print(f"{info.spec}, R = {args.reduction}, {args.threads} threads, original top-1 {reference['top1']:.2f}%")
    print("Reductions (positive: smaller or faster than the original; negative: slower).")
    head = "| objective | FLOPs red. | " + " | ".join(f"latency red. b{b}, predicted | measured" for b in args.batches) + " | top-1 drop (pp) |"
    print(head)
    print("| --- |" + " ---: |" * (2 + 2 * len(args.batches)))
    for row in rows:
        if "error" in row:
            print(f"| {row['objective']} | budget not met: {row['error']} |")
            continue
        cells = [f"{100 * row['flops_reduction']:.2f}%"]
        for b in args.batches:
            cells += [f"{100 * row[f'predicted_b{b}']:.2f}%", f"{100 * row[f'measured_b{b}']['reduction']:.2f}%"]
        print(f"| {row['objective']} | " + " | ".join(cells) + f" | {row['drop_pp']:.2f} |")
    for row in rows:
        if "latency_table" in row:
            t = row["latency_table"]
            print(f"lookup table for {row['objective']}: {t['entries']} entries, {t['measured']} measured in {t['measure_seconds']:.1f}s "
                  f"({t['seconds']:.1f}s with the whole model), {t['noisy']} disturbed")

    meta = {
        "model": info.spec, "data": args.data, "reduction": args.reduction, "epochs": args.epochs,
        "search_images": args.search_images, "seed": args.seed,
        "threads": args.threads, "batches": args.batches, "rounds": args.rounds, "repeats": args.repeats,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__, "date": date.today().isoformat(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "original_top1": reference["top1"],
    }
    out = write_json(args.out or result_path("latency_objective", f"{info.spec.replace(':', '_')}.json"), {"meta": meta, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
