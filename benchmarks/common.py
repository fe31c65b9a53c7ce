"""The prologue every benchmark shares: its arguments (model, data, threads, device, seed, out), the
threads, the model and data, where its results go and the JSON it writes, and the markdown tables
it prints.

The benchmarks are modules of the ``benchmarks`` package, run from the repository root:

    .venv/bin/python -m benchmarks.tables.post_training_comparison --help

Each writes under ``benchmarks/results/<script name>/``: ``*.json`` results, ``*.log`` logs (the
printed output, kept by hand with ``| tee``), ``*.png`` plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from svdnas.data.datasets import DataBundle, load_data
from svdnas.models.build import build_model

RESULTS = Path("benchmarks/results")


def parser(doc: str | None, *, model: str | None = "zoo:resnet18", data: str | None = "fmnist", threads: int | None = 2,
           seed: int | None = 0, device: bool = False, out: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the shared options; ``None`` leaves an option out.

    ``out`` is the help text of ``--out`` (default None: a path the script derives)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is not None:
        p.add_argument("--model", default=model, help=f"the model's spec (default {model})")
    if data is not None:
        p.add_argument("--data", default=data, help=f"the data set (default {data})")
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed)
    if device:
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    if out is not None:
        p.add_argument("--out", default=None, help=out)
    return p


def setup(args: argparse.Namespace, *, manual_seed: int | None = None) -> None:
    """Set torch's threads from ``--threads`` (and its global seed, where the script always seeded it)."""
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    if manual_seed is not None:
        torch.manual_seed(manual_seed)


def model_and_data(args: argparse.Namespace, test_images: int | None = None):
    """``build_model(args.model)`` and ``load_data(args.data)``, the data on its first ``test_images``
    test images: ``(model, info, data)``."""
    model, info = build_model(args.model)
    return model, info, first_test_images(load_data(args.data), test_images)


def first_test_images(data: DataBundle, n: int | None) -> DataBundle:
    """``data`` evaluated on its first ``n`` test images only (all of them when ``n`` is None)."""
    if n is None:
        return data
    return dataclasses.replace(data, test=Subset(data.test, range(min(n, len(data.test)))))


def short_name(spec: str) -> str:
    """A model spec as a file name's part: ``zoo:resnet18`` -> ``resnet18``."""
    return spec.split(":")[-1]


def result_path(script: str, name: str) -> Path:
    """``benchmarks/results/<script>/<name>``: where a script's result of that name goes."""
    return RESULTS / script / name


def machine(threads: int) -> str:
    """What a result was measured on, as the JSON files record it."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {threads} threads"


def stamp(threads: int) -> dict[str, str]:
    """When, where and how a result was measured: the date, :func:`machine` and the command line."""
    return {"date": date.today().isoformat(), "machine": machine(threads), "command": shlex.join(["python", *sys.argv])}


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (its folder made first); the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A markdown table: ``align`` per column, ``"l"`` or ``"r"`` (default: the first left, the rest right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def post_training_table(path: Path) -> str:
    """The post-training comparison's JSON as a markdown table: top-1 drop (pp) of every method at every
    reduction target, the best of each column in bold, then per column whether svdnas is ahead of the
    best baseline and by how much."""
    data = json.loads(Path(path).read_text())
    rows, meta = data["rows"], data["meta"]
    targets = sorted({r["reduction_target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: (not r["method"].startswith("svdnas"), r["method"]))))
    cell = {(r["method"], r["reduction_target"]): r for r in rows}
    original = rows[0]["original_top1"]
    head = (f"`{meta['model']}`, original top-1 {original:.2f} on {meta['test_images']} test images, "
            f"measured {meta['date']} ({meta['machine']}): top-1 drop in pp (achieved FLOPs reduction)")
    out = [head, ""]
    best = {t: min((r["drop_pp"] for r in rows if r["reduction_target"] == t), default=None) for t in targets}
    body = []
    for m in methods:
        cells = []
        for t in targets:
            r = cell.get((m, t))
            if r is None:
                cells.append("-")
                continue
            v = f"{r['drop_pp']:.2f} ({100 * r['flops_reduction']:.1f}%)"
            cells.append(f"**{v}**" if r["drop_pp"] == best[t] else v)
        body.append([m, *cells])
    out.append(markdown_table(["method", *(f"R = {t:g}" for t in targets)], body))
    verdicts = []
    for t in targets:
        ours = [r for r in rows if r["reduction_target"] == t and r["method"].startswith("svdnas")]
        others = [r for r in rows if r["reduction_target"] == t and not r["method"].startswith("svdnas")]
        if ours and others:
            a = min(ours, key=lambda r: r["drop_pp"])
            b = min(others, key=lambda r: r["drop_pp"])
            word = "ahead of" if a["drop_pp"] < b["drop_pp"] else "behind"
            verdicts.append(f"R = {t:g}: {a['method']} {word} the best baseline ({b['method']}) by {abs(b['drop_pp'] - a['drop_pp']):.2f}pp")
    return "\n".join(out + ["", "; ".join(verdicts) + "."])
