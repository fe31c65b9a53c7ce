"""How far can a whole-model latency comparison be trusted on this machine? The same two models
(the original and a compressed plan) compared again and again, each time in fresh sessions, under
several timing set-ups; the spread of the measured reduction is what a latency budget can be met to.

    .venv/bin/python -m benchmarks.diagnostics.timing_stability --model zoo:resnet18 \\
        --plan benchmarks/results/compress_time/demo_default.report.json --trials 6

Set-ups: ``svdnas.cost.timer.compare_latency`` (31 interleaved rounds, the median of the rounds'
own reductions, ONNX Runtime's threads stopped from spinning after each run) in ONNX Runtime at
``--threads`` and at one thread and in PyTorch eager; and, for comparison, the way it measured
before 2026-12-04 ("previous": three rounds of ten runs, the ratio of the medians, ONNX Runtime's
sessions spinning as they do by default). Each trial times both models again in fresh sessions;
the set-ups take turns trial by trial so that a slow spell of the machine hits them alike. Writes
benchmarks/results/timing_stability/<model>.json.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks.common import markdown_table, parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.timer import compare_latency, latency_runner, measure, timing_threads
from svdnas.lowrank.plan import Plan
from svdnas.models.build import build_model
from svdnas.surgery.swap import apply_plan

SETUPS = {
    "onnxruntime, previous": {"runtime": "onnxruntime", "previous": True},
    "onnxruntime": {"runtime": "onnxruntime"},
    "onnxruntime, 1 thread": {"runtime": "onnxruntime", "threads": 1},
    "torch, previous": {"runtime": "torch", "previous": True},
    "torch": {"runtime": "torch"},
}


def previous_compare(original, compressed, input_shape, runtime, *, batch, threads) -> dict[str, float]:
    """The comparison as ``compare_latency`` made it before 2026-12-04: three interleaved rounds of
    ten runs, sessions spinning (ONNX Runtime's default), the ratio of the rounds' middle medians."""
    device = torch.device("cpu")
    with timing_threads(threads):
        runs = [latency_runner(m, input_shape, runtime, batch, device, threads) for m in (original, compressed)]
        medians: list[list[float]] = [[], []]
        for _ in range(3):
            for k, fn in enumerate(runs):
                medians[k].append(measure(fn, warmup=3, repeats=10)["median_ms"])
    before, after = (sorted(m)[1] for m in medians)
    return {"original_ms": before, "compressed_ms": after, "reduction": 1 - after / before}


def main() -> None:
    p = parser(__doc__, data=None, out="JSON to write (default benchmarks/results/timing_stability/<model>.json)")
    p.add_argument("--plan", default="benchmarks/results/compress_time/demo_default.report.json",
                   help="a report.json (its layers) or plan.json")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=31, help="compare_latency's rounds (default 31, its default)")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = p.parse_args()
    setup(args, manual_seed=0)
    model, info = build_model(args.model)
    plan = Plan.from_dict({"layers": json.loads(Path(args.plan).read_text())["layers"]})
    compressed = apply_plan(build_model(args.model)[0], plan)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.setups}
    for trial in range(args.trials):
        for name in args.setups:
            s = SETUPS[name]
            kw = {} if s.get("previous") else {"rounds": args.rounds}
            timer = previous_compare if s.get("previous") else compare_latency
            r = timer(model, compressed, info.input_shape, s["runtime"], batch=args.batch, threads=s.get("threads", args.threads), **kw)
            r["load_average"] = os.getloadavg()[0]
            results[name].append(r)
            print(f"trial {trial} {name}: {r['original_ms']:.3f} -> {r['compressed_ms']:.3f} ms, reduction {r['reduction']:+.3f}",
                  flush=True)
    rows = []
    for name, rs in results.items():
        red = [r["reduction"] for r in rs]
        rows.append([name, s_threads(name, args.threads), f"{statistics.median(r['original_ms'] for r in rs):.3f}",
                     f"{statistics.median(red):+.3f}", f"{min(red):+.3f}", f"{max(red):+.3f}",
                     f"{statistics.stdev(red):.3f}" if len(red) > 1 else ""])
    print(f"\n{args.model} against the plan of {args.plan}, batch {args.batch}, {args.trials} trials, {args.rounds} rounds, "
          f"{stamp(args.threads)}")
    print(markdown_table(["set-up", "threads", "original (ms, median)", "reduction, median", "min", "max", "std"], rows))
    out = args.out or result_path("timing_stability", f"{short_name(args.model)}.json")
    write_json(out, {**stamp(args.threads), "model": args.model, "plan": args.plan, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                     "torch": torch.__version__, "results": results})
    print(f"wrote {out}")


def s_threads(name: str, threads: int) -> int:
    return SETUPS[name].get("threads", threads)


if __name__ == "__main__":
    main()
