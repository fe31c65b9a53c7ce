"""Per-step cost of the search: a plain training step of the original model, the default `mixed`
super model and the release's `two`-sample scheme, on the same model, batch and candidates.

    .venv/bin/python benchmarks/search_cost.py [--model zoo:resnet18] [--batch 128] [--repeats 5]

Prints a table (medians of interleaved repeats, ratios to the training step) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from svdnas.cost import model_macs
from svdnas.models import build_model
from svdnas.pipeline import CompressConfig, _limit_groups
from svdnas.search import MixedLayer, build_supernet, grid_candidates
from svdnas.surgery import example_input, select_targets, trace_layers


def supernet_for(model, shape, filt, fractions, max_groups, sampling):
    infos = trace_layers(model, example_input(model, shape))
    targets, _ = select_targets(model, infos, filt)
    t0 = time.perf_counter()
    cands = {n: _limit_groups(grid_candidates(n, model.get_submodule(n), infos[n].input_hw, fractions), max_groups) for n in targets}
    net, _ = build_supernet(model, cands, sampling)
    return net, sum(len(c) - 1 for c in cands.values()), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="zoo:resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--max-groups", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/search_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, info = build_model(args.model)
    shape = info.input_shape
    fractions = CompressConfig(reduction=args.reduction).fractions()
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(train_model.parameters(), lr=0.0)

    def train_step():
        loss = F.cross_entropy(train_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    nets, build = {}, {}
    for sampling in ("mixed", "two"):
        net, n, secs = supernet_for(model, shape, info.default_filter, fractions, args.max_groups, sampling)
        net.eval()
        for prm in net.parameters():
            prm.requires_grad_(False)
        thetas = [m.theta for m in net.modules() if isinstance(m, MixedLayer)]
        for t in thetas:
            t.requires_grad_(True)
        nets[sampling] = (net, torch.optim.Adam(thetas, lr=0.01))
        build[sampling] = {"seconds": secs, "candidates": n}

    def search_step(sampling):
        net, o = nets[sampling]
        loss = F.cross_entropy(net(x), y)
        o.zero_grad()
        loss.backward()
        o.step()

    steps = {"train": train_step, "mixed": lambda: search_step("mixed"), "two": lambda: search_step("two")}
    times = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, batch {args.batch}, {build['mixed']['candidates']} candidates, grid {fractions[0]}..{fractions[-1]}, threads {args.threads}")
    print(f"{'step':10s} {'median s':>9s} {'x train':>8s}")
    for k in steps:
        print(f"{k:10s} {med[k]:9.3f} {med[k] / med['train']:8.2f}")
    print(f"super model build: mixed {build['mixed']['seconds']:.1f}s, two {build['two']['seconds']:.1f}s")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    result = {
        "model": args.model, "batch": args.batch, "threads": args.threads, "grid": fractions, "build": build,
        "median_seconds": med, "ratio_to_train": {k: med[k] / med["train"] for k in med}, "times": times,
        "macs": model_macs(model, shape), "machine": platform.processor() or platform.machine(), "date": date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
