"""The fastest way to run a compressed model in PyTorch on this CPU, and why eager is slow.

    .venv/bin/python -m benchmarks.diagnostics.pytorch_paths [--plan-from benchmarks/results/imagenet_compress/resnet18_imagenet_0.6.json]

Takes the plan a ``compress`` run wrote (the ``plan`` of an ``imagenet_compress`` JSON, or a run's
``plan.json``), applies it to the model (random weights: factors from the weight; timing only) and
times the original and the compressed model in interleaved rounds, at batch 1 in every way PyTorch
offers to run them here: eager in the default memory format, eager channels-last, TorchScript
(traced, frozen, ``optimize_for_inference``), ``torch.compile`` (inductor, where it compiles) and,
beside them, ONNX Runtime; at ``--batch`` eager, channels-last and ONNX Runtime. Then the PyTorch profiler's view of one eager inference of
each model: time by operator, so that the table says where eager's time goes. Writes
benchmarks/results/pytorch_paths/<model>.json.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import parser, result_path, setup, short_name, stamp, write_json
from svdnas.cost.timer import latency_runner, measure, onnxruntime_available, timing_threads
from svdnas.lowrank.plan import Plan
from svdnas.models.build import build_model
from svdnas.surgery.swap import apply_plan


def eager(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


def channels_last(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    m = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    return lambda: m(xc)


def torchscript(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
    return lambda: traced(x)


def compiled(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    fn = torch.compile(model)
    fn(x)  # compiles
    return lambda: fn(x)


PATHS = {"eager": eager, "channels_last": channels_last, "torchscript": torchscript, "compile": compiled}


def build_runs(models: dict[str, nn.Module], shape, batch: int, paths: list[str], threads: int) -> tuple[dict, dict, dict]:
    """One callable per (path, model); the seconds each took to prepare (compilation); errors by path."""
    runs, prep, errors = {}, {}, {}
    for path in paths:
        for which, model in models.items():
            x = torch.randn(batch, *shape)
            t0 = time.perf_counter()
            try:
                with timing_threads(threads):
                    if path == "onnxruntime":
                        runs[path, which] = latency_runner(model, shape, "onnxruntime", batch, torch.device("cpu"), threads, stop_spinning=True)
                    else:
                        runs[path, which] = PATHS[path](copy.deepcopy(model).eval(), x)
                    runs[path, which]()
            except Exception as e:  # noqa: BLE001 - a path that does not work here is a finding
                errors[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                runs.pop((path, "original"), None)
                break
            prep[f"{path}/{which}"] = time.perf_counter() - t0
    return runs, prep, errors


def time_rounds(runs: dict, threads: int, rounds: int, repeats: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds over every callable; per (path, model) the median of the rounds' medians."""
    per: dict = {k: [] for k in runs}
    with timing_threads(threads):
        for fn in runs.values():
            measure(fn, warmup=2, repeats=2)
        for _ in range(rounds):
            for k, fn in runs.items():
                per[k].append(measure(fn, warmup=1, repeats=repeats)["median_ms"])
    return {f"{p}/{w}": {"median_ms": statistics.median(v), "rounds": v} for (p, w), v in per.items()}


def profile(model: nn.Module, shape, threads: int, top: int = 12) -> list[dict]:
    """Self CPU time by operator over 20 eager inferences at batch 1 (the default memory format)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    x = torch.randn(1, *shape)
    with timing_threads(threads):
        for _ in range(3):
            model(x)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(20):
                model(x)
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "calls_per_run": e.count / 20, "self_ms_per_run": e.self_cpu_time_total / 20 / 1000,
             "share": e.self_cpu_time_total / total} for e in rows[:top]]


def main() -> None:
    p = parser(__doc__, model="zoo:resnet18_imagenet", data=None, out="JSON to write (default benchmarks/results/pytorch_paths/<model>.json)")
    p.add_argument("--plan-from", default="benchmarks/results/imagenet_compress/resnet18_imagenet_0.6.json",
                   help="a JSON with a 'plan' (imagenet_compress's) or a plan.json")
    p.add_argument("--batch", type=int, default=32, help="the throughput batch (0: batch 1 only)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paths", nargs="+", default=["eager", "channels_last", "torchscript", "compile", "onnxruntime"])
    args = p.parse_args()
    setup(args, manual_seed=0)
    if "eager" not in args.paths:
        p.error("--paths must include eager: every figure is also given against the eager original")
    original, info = build_model(args.model, pretrained=False)
    shape = tuple(info.input_shape)
    doc = json.loads(Path(args.plan_from).read_text())
    plan = Plan.from_dict(doc.get("plan", doc))
    compressed = apply_plan(build_model(args.model, pretrained=False)[0].eval(), plan)
    models = {"original": original.eval(), "compressed": compressed.eval()}
    paths = [x for x in args.paths if x != "onnxruntime" or onnxruntime_available()]
    out = {"model": f"{args.model} (random weights)", "plan_from": args.plan_from, "paths": {}, **stamp(args.threads)}
    for batch in [1] + ([args.batch] if args.batch else []):
        batch_paths = paths if batch == 1 else [x for x in paths if x in ("eager", "channels_last", "onnxruntime")]
        runs, prep, errors = build_runs(models, shape, batch, batch_paths, args.threads)
        times = time_rounds(runs, args.threads, args.rounds, args.repeats)
        base = times["eager/original"]["median_ms"]
        table = {}
        for path in batch_paths:
            if path in errors:
                table[path] = {"error": errors[path]}
                print(f"batch {batch} {path:14s} does not run here: {errors[path]}")
                continue
            o, c = times[f"{path}/original"]["median_ms"], times[f"{path}/compressed"]["median_ms"]
            table[path] = {"original_ms": o, "compressed_ms": c, "reduction": 1 - c / o, "compressed_vs_eager_original": 1 - c / base,
                           "prepare_seconds": prep.get(f"{path}/compressed")}
            print(f"batch {batch} {path:14s} original {o:8.2f} ms  compressed {c:8.2f} ms  (-{100 * (1 - c / o):5.1f}%; "
                  f"{100 * (1 - c / base):5.1f}% below eager original)", flush=True)
        out["paths"][f"batch_{batch}"] = table
    out["profile_batch_1"] = {}
    for which, model in models.items():
        rows = profile(model, shape, args.threads)
        out["profile_batch_1"][which] = rows
        print(f"eager {which}, self CPU time per inference by operator:")
        for r in rows:
            print(f"  {r['op']:40s} {r['calls_per_run']:5.0f} calls  {r['self_ms_per_run']:8.2f} ms  {100 * r['share']:5.1f}%")
    print(f"wrote {write_json(args.out or result_path('pytorch_paths', short_name(args.model) + '.json'), out)}")


if __name__ == "__main__":
    main()
