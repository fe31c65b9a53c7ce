"""Per-step cost of the search: a plain training step of the original model, the default `mixed`
super model (its rank windows in the default precision: bfloat16 where the device multiplies it
natively), the same in float32 (`mixed-float32`) and the release's `two`-sample scheme, on the same
model, batch and candidates.

    .venv/bin/python -m benchmarks.tables.search_step_cost [--model zoo:resnet18] [--batch 128] [--repeats 5]

Prints a table (medians of interleaved repeats, ratios to the training step) and writes JSON.
Peak memory: each kind of step also runs in a fresh process of its own (3 steps after the model and
one batch are loaded), and the growth of that process's peak resident memory over what it held
before building the step's model is reported, as a ratio to the training step's (--no-memory skips it).
With --device cuda the steps run on the GPU (timed with a synchronisation after each) and memory is
the GPU's: for each kind, the peak allocated while its model is built and stepped 3 times, over what
was allocated before (one kind at a time, the others' models not yet on the GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import parser, result_path, short_name, write_json
from svdnas.cost.counting import model_macs
from svdnas.models.build import build_model
from svdnas.pipeline.config import CompressConfig
from svdnas.search import MixedLayer, build_supernet, grid_candidates, window_dtype
from svdnas.search.candidates import limit_groups
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers

# kind of step -> (sampling, precision of the rank windows)
KINDS = {"mixed": ("mixed", "auto"), "mixed-float32": ("mixed", "float32"), "two": ("two", "auto")}


def supernet_for(model, shape, filt, fractions, max_groups, sampling, dtype="auto", device="cpu"):
    infos = trace_layers(model, example_input(model, shape))
    targets, _ = select_targets(model, infos, filt)
    t0 = time.perf_counter()
    cands = {n: limit_groups(grid_candidates(n, model.get_submodule(n), infos[n].input_hw, fractions), max_groups) for n in targets}
    net, _ = build_supernet(model, cands, sampling, window_dtype(dtype, device))
    return net, sum(len(c) - 1 for c in cands.values()), time.perf_counter() - t0


def logits_only(net: torch.nn.Module) -> torch.optim.Optimizer:
    """Freeze ``net`` but its super blocks' logits, as the search does; the logits' optimiser."""
    net.eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    thetas = [m.theta for m in net.modules() if isinstance(m, MixedLayer)]
    for t in thetas:
        t.requires_grad_(True)
    return torch.optim.Adam(thetas, lr=0.01)


def _status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak since this program started: unlike getrusage's
    ru_maxrss, which Linux carries over from the parent across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def step_model(kind: str, model, shape, info, args, dev: torch.device):
    """The model one kind of step trains ("train": a copy of the original, all its weights) on ``dev``,
    and its optimiser."""
    if kind == "train":
        net = copy.deepcopy(model).to(dev).train()
        return net, torch.optim.SGD(net.parameters(), lr=0.0)
    fractions = CompressConfig(reduction=args.reduction).fractions()
    net, _, _ = supernet_for(model, shape, info.default_filter, fractions, args.max_groups, *KINDS[kind], dev)
    net = net.to(dev)
    return net, logits_only(net)


def three_steps(net, opt, x, y) -> None:
    for _ in range(3):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def probe(kind: str, args) -> None:
    """Runs in a child process: build one kind of step, run it 3 times, print the memory growth."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, info = build_model(args.model)
    shape = info.input_shape or tuple(args.input_shape)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))
    before = _status_mib("VmRSS")
    net, opt = step_model(kind, model, shape, info, args, torch.device("cpu"))
    three_steps(net, opt, x, y)
    peak = _status_mib("VmHWM")
    print(json.dumps({"kind": kind, "rss_before_mib": before, "peak_rss_mib": peak, "growth_mib": peak - before}))


def memory(args) -> dict[str, dict]:
    out = {}
    for kind in ("train", *KINDS):
        cmd = [sys.executable, "-m", "benchmarks.tables.search_step_cost", "--probe", kind, "--model", args.model, "--batch", str(args.batch), "--reduction", str(args.reduction),
               "--max-groups", str(args.max_groups), "--threads", str(args.threads), "--input-shape", *map(str, args.input_shape)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gpu_memory(args, dev: torch.device) -> dict[str, dict]:
    """Per kind of step, on the GPU: peak allocated while its model is built, moved there and stepped
    3 times, over what was allocated before; the model is freed before the next kind."""
    torch.manual_seed(0)
    model, info = build_model(args.model)
    shape = info.input_shape or tuple(args.input_shape)
    x = torch.randn(args.batch, *shape, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    out = {}
    for kind in ("train", *KINDS):
        sync(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        net, opt = step_model(kind, model, shape, info, args, dev)
        three_steps(net, opt, x, y)
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        out[kind] = {"kind": kind, "allocated_before_mib": before / 2**20, "peak_mib": peak / 2**20, "growth_mib": (peak - before) / 2**20}
        del net, opt
    return out


def main() -> None:
    p = parser(__doc__, data=None, seed=None, device=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--max-groups", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/search_step_cost/<model>.json)")
    p.add_argument("--input-shape", type=int, nargs=3, default=[1, 28, 28], help="C H W, for module: models")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory processes (updates --out's JSON)")
    p.add_argument("--probe", choices=("train", *KINDS), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out or str(result_path("search_step_cost", f"{short_name(args.model)}.json"))
    if args.probe:
        probe(args.probe, args)
        return
    dev = torch.device(args.device)
    # first: the CPU's probes are separate processes
    mem = {} if args.no_memory else gpu_memory(args, dev) if dev.type == "cuda" else memory(args)
    if args.memory_only:
        for k, m in mem.items():
            print(f"{k:14s} peak growth {m['growth_mib']:8.0f} MiB  {m['growth_mib'] / mem['train']['growth_mib']:5.2f}x train")
        if args.out:
            path = Path(args.out)
            old = json.loads(path.read_text()) if path.is_file() else {}
            old.update({"memory_mib": mem, "memory_ratio_to_train": {k: m["growth_mib"] / mem["train"]["growth_mib"] for k, m in mem.items()},
                        "memory_date": date.today().isoformat()})
            write_json(path, old)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, info = build_model(args.model)
    shape = info.input_shape or tuple(args.input_shape)
    fractions = CompressConfig(reduction=args.reduction).fractions()
    x = torch.randn(args.batch, *shape, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    train_model, opt = step_model("train", model, shape, info, args, dev)

    def train_step():
        loss = F.cross_entropy(train_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    nets, build = {}, {}
    for kind, (sampling, dtype) in KINDS.items():
        net, n, secs = supernet_for(model, shape, info.default_filter, fractions, args.max_groups, sampling, dtype, dev)
        net = net.to(dev)
        nets[kind] = (net, logits_only(net))
        build[kind] = {"seconds": secs, "candidates": n}

    def search_step(kind):
        net, o = nets[kind]
        loss = F.cross_entropy(net(x), y)
        o.zero_grad()
        loss.backward()
        o.step()

    steps = {"train": train_step, **{k: (lambda k=k: search_step(k)) for k in KINDS}}
    times = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for k, fn in steps.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # each repeat's step over the training step of the same repeat: drifts of a shared machine cancel
    paired = {k: statistics.median(t / t0 for t, t0 in zip(v, times["train"])) for k, v in times.items()}
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"threads {args.threads}"
    print(f"model {args.model}, batch {args.batch}, {build['mixed']['candidates']} candidates, grid {fractions[0]}..{fractions[-1]}, {where}")
    print(f"{'step':14s} {'median s':>9s} {'x train':>8s} {'paired x train':>15s}")
    for k in steps:
        print(f"{k:14s} {med[k]:9.3f} {med[k] / med['train']:8.2f} {paired[k]:15.2f}")
    print(f"mixed: rank windows in {window_dtype('auto', dev)}")
    print("super model build: " + ", ".join(f"{k} {b['seconds']:.1f}s" for k, b in build.items()))
    if mem:
        base = mem["train"]["growth_mib"]
        print(f"{'process':14s} {'peak growth MiB':>16s} {'x train':>8s}")
        for k, m in mem.items():
            print(f"{k:14s} {m['growth_mib']:16.0f} {m['growth_mib'] / base:8.2f}")
    result = {
        "model": args.model, "batch": args.batch, "threads": args.threads, "grid": fractions, "build": build,
        "median_seconds": med, "ratio_to_train": {k: med[k] / med["train"] for k in med}, "paired_ratio_to_train": paired, "times": times, "memory_mib": mem,
        "memory_ratio_to_train": {k: m["growth_mib"] / mem["train"]["growth_mib"] for k, m in mem.items()} if mem else {},
        "macs": model_macs(model, shape), "machine": platform.processor() or platform.machine(), "date": date.today().isoformat(),
        "mixed_window_dtype": str(window_dtype("auto", dev)).removeprefix("torch."), "device": args.device, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
