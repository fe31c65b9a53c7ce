"""Markdown tables of the post-training benchmark's JSON files (what RESULTS.md and the README show).

    .venv/bin/python benchmarks/summarize.py benchmarks/results/post_training_zoo_*.json

One table per file: top-1 drop (pp) of every method at every reduction target, the best value of
each column in bold, and per column whether svdnas is ahead of the best baseline and by how much.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    rows, meta = data["rows"], data["meta"]
    targets = sorted({r["reduction_target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: (not r["method"].startswith("svdnas"), r["method"]))))
    cell = {(r["method"], r["reduction_target"]): r for r in rows}
    original = rows[0]["original_top1"]
    out = [f"`{meta['model']}`, original top-1 {original:.2f} on {meta['test_images']} test images, "
           f"measured {meta['date']} ({meta['machine']}): top-1 drop in pp (achieved FLOPs reduction)", ""]
    out.append("| method | " + " | ".join(f"R = {t:g}" for t in targets) + " |")
    out.append("| --- | " + " | ".join("---:" for _ in targets) + " |")
    best = {t: min((r["drop_pp"] for r in rows if r["reduction_target"] == t), default=None) for t in targets}
    for m in methods:
        cells = []
        for t in targets:
            r = cell.get((m, t))
            if r is None:
                cells.append("-")
                continue
            v = f"{r['drop_pp']:.2f} ({100 * r['flops_reduction']:.1f}%)"
            cells.append(f"**{v}**" if r["drop_pp"] == best[t] else v)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    print("\n\n".join(table(f) for f in args.files))


if __name__ == "__main__":
    main()
