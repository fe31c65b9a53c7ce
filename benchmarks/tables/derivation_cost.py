"""What the output-aware derivation costs: ``compress`` with the paper's weight factors beside the
default (statistics, whitened candidates, prefix fit) and the default summing every patch, run in
turns (one of each, then again) so that a slow spell of a shared machine falls on every setting.

    .venv/bin/python -m benchmarks.tables.derivation_cost --model zoo:resnet18 --reduction 0.6 --rounds 3

Each run is the Python API's ``compress`` with every other default (seed 0), in this process, on the
whole test split; the original's accuracy is measured once. Prints per setting the median seconds of
each stage over the rounds, the median total, its ratio to the weight derivation's, and the drop of
each run (the plan can differ between settings; within one it is the same every round unless timing
changes the candidates offered). Writes benchmarks/results/derivation_cost/<model>_<reduction>.json.

With ``--fresh-processes`` each run is a Python process of its own (this module again, with the
original's accuracy handed over), as each ``svdnas compress`` is: the first run in a process pays for
what later runs in it reuse (likely among it the memory a new thread's allocator has not touched yet: the
prefix fit's forward passes run on threads of their own), and in-process rounds after the first hide that.

Like the command line, every process here (this one and each fresh one) allocates from one glibc
arena (:func:`svdnas.cli.process.one_malloc_arena`) unless ``MALLOC_ARENA_MAX`` is set: run with
``MALLOC_ARENA_MAX=16`` (glibc's own limit on 2 cores) to measure without it. The JSON's ``meta``
says which.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from torch import nn

from benchmarks.common import markdown_table, model_and_data, parser, result_path, setup, short_name, stamp, write_json
from svdnas.cli.process import one_malloc_arena
from svdnas.data.datasets import DataBundle
from svdnas.data.evaluate import evaluate
from svdnas.models.build import ModelInfo
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig

SETTINGS = {
    "weight": {"derivation": "weight"},
    "default": {},
    "every patch": {"calibration_patches": 0},
}


def one_run(model: nn.Module, info: ModelInfo, data: DataBundle, args: argparse.Namespace, name: str,
            reference: dict[str, float]) -> dict:
    """One ``compress`` of setting ``name``: its stages' seconds, wall time, drop, FLOPs reduction and plan."""
    config = CompressConfig(reduction=args.reduction, **SETTINGS[name])
    t0 = time.perf_counter()
    result = compress(model, data, config, input_shape=info.input_shape, filter_fn=info.default_filter, seed=args.seed,
                      reference=reference)
    rep = result.report
    return {"seconds": rep["seconds"], "wall_seconds": time.perf_counter() - t0, "drop_pp": rep["top1"]["drop_pp"],
            "flops_reduction": rep["flops"]["reduction"], "plan": result.plan.to_dict()}


def in_fresh_process(args: argparse.Namespace, name: str, reference: dict[str, float]) -> dict:
    """:func:`one_run` in a new Python process (this module with ``--one``), its record read from its last line."""
    command = [sys.executable, "-m", "benchmarks.tables.derivation_cost", "--model", args.model, "--data", args.data,
               "--threads", str(args.threads), "--seed", str(args.seed), "--reduction", str(args.reduction),
               "--one", name, "--reference", json.dumps(reference)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/derivation_cost/<model>_<reduction>.json)")
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--fresh-processes", action="store_true",
                   help="each compress in a Python process of its own, as the command line runs it")
    p.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)  # a fresh process's single run
    p.add_argument("--reference", help=argparse.SUPPRESS)  # with --one: the original's accuracy, as JSON
    args = p.parse_args()
    if args.one and not args.reference:
        p.error("--one needs --reference, the original's accuracy as JSON")
    one_arena = one_malloc_arena()  # as the command line does
    setup(args)
    model, info, data = model_and_data(args)
    if args.one:
        print(json.dumps(one_run(model, info, data, args, args.one, json.loads(args.reference))), flush=True)
        return
    reference = evaluate(model, data.test)
    runs: dict[str, list[dict]] = {name: [] for name in args.settings}
    for r in range(args.rounds):
        for name in args.settings:
            record = in_fresh_process(args, name, reference) if args.fresh_processes else one_run(model, info, data, args, name, reference)
            runs[name].append(record)
            print(f"round {r + 1} {name:12s} compress {record['seconds']['total']:6.1f}s  drop {record['drop_pp']:.2f}pp  "
                  f"FLOPs -{100 * record['flops_reduction']:.2f}%", flush=True)
    medians = {name: {k: statistics.median(x["seconds"].get(k, 0.0) for x in rs) for k in rs[0]["seconds"]} for name, rs in runs.items()}
    base = medians.get("weight", {}).get("total")
    stages = [k for k in dict.fromkeys(k for m in medians.values() for k in m) if k != "total"]
    rows = [[s] + [f"{m.get(s, 0.0):.1f}" for m in medians.values()] for s in stages]
    rows.append(["**total (median)**"] + [f"**{m['total']:.1f}**" for m in medians.values()])
    if base:
        rows.append(["against weight"] + [f"{m['total'] / base:.2f}x" for m in medians.values()])
    rows.append(["drops (pp)"] + [" / ".join(f"{x['drop_pp']:.2f}" for x in rs) for rs in runs.values()])
    meta = {"model": info.spec, "data": args.data, "reduction": args.reduction, "rounds": args.rounds, "original_top1": reference["top1"],
            "fresh_processes": args.fresh_processes, "one_malloc_arena": one_arena,
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX"), **stamp(args.threads)}
    out = args.out or result_path("derivation_cost", f"{short_name(info.spec)}_{args.reduction:g}.json")
    write_json(out, {"meta": meta, "runs": runs, "median_seconds": medians})
    print()
    where = "each run in a process of its own" if args.fresh_processes else "one process"
    print(f"`{info.spec}` at {args.reduction:.0%} FLOPs, {args.rounds} rounds, {where}, {meta['date']} ({meta['machine']}); "
          "median seconds per stage")
    print(markdown_table(["seconds", *runs], rows))


if __name__ == "__main__":
    main()
