"""Where each plan spends its budget: per target layer, the share of the layer's FLOPs a plan keeps
and the branch it chose, for run directories of one model side by side (what ALDS does on
EfficientNet-B0 that the search does not). Reads only the runs' report.json; nothing is run.

    .venv/bin/python -m benchmarks.diagnostics.budget_allocation runs/svdnas runs/alds [--grid-low 0.65 --max-groups 8]

With ``--grid-low`` and ``--max-groups`` (the search's default grid floor and group limit for the
runs' budget) it also counts the layers whose chosen branch lies outside that part of the space.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import markdown_table, parser


def allocation(run: Path) -> dict[str, tuple[float, str, int]]:
    """Per target layer: (FLOPs kept / original, the branches as text, the largest group count)."""
    out = {}
    for layer in json.loads((run / "report.json").read_text())["layers"]:
        before, after = layer["flops"]
        branches = layer.get("branches") or []
        text = " + ".join(f"{b['first_kernel'][0]}x{b['first_kernel'][1]}-first/g{b['groups'][0]}x{b['groups'][1]}/r{b['rank']}" for b in branches)
        groups = max((max(b["groups"]) for b in branches), default=1)
        out[layer["name"]] = (after / before, text or "original", groups)
    return out


def main() -> None:
    p = parser(__doc__, model=None, data=None, threads=None, seed=None)
    p.add_argument("runs", nargs="+", type=Path, help="run directories written by compress or baseline (same model)")
    p.add_argument("--grid-low", type=float, default=None, help="the search grid's smallest kept share")
    p.add_argument("--max-groups", type=int, default=None, help="the search's largest group count")
    p.add_argument("--all", action="store_true", help="list every layer, also those no run compresses")
    args = p.parse_args()
    allocs = [allocation(r) for r in args.runs]
    names = list(allocs[0])
    body = []
    for name in names:
        cells = [a.get(name) for a in allocs]
        if not args.all and all(c is None or c[1] == "original" for c in cells):
            continue
        body.append([name, *("-" if c is None else f"{c[0]:.2f} {c[1]}" for c in cells)])
    print(markdown_table(["layer", *(r.name for r in args.runs)], body))
    print()
    for run, a in zip(args.runs, allocs):
        compressed = [v for v in a.values() if v[1] != "original"]
        line = (f"{run.name}: {len(compressed)} of {len(a)} layers compressed, smallest kept share "
                f"{min((v[0] for v in compressed), default=1.0):.2f}, largest group count {max((v[2] for v in compressed), default=1)}")
        if args.grid_low is not None or args.max_groups is not None:
            outside = [v for v in compressed if (args.grid_low is not None and v[0] < args.grid_low - 1e-9)
                       or (args.max_groups is not None and v[2] > args.max_groups)]
            line += f"; {len(outside)} outside the search's default space"
        print(line)


if __name__ == "__main__":
    main()
