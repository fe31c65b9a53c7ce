"""Side by side, the seconds of every stage of several runs of ``compress`` (their ``report.json``),
with the FLOPs reduction, the top-1 drop and the peak memory of each.

    .venv/bin/python -m benchmarks.tools.stage_table NAME=runs/a/report.json NAME=runs/b/report.json

Prints a markdown table, one column per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import markdown_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=PATH of a report.json (or of its run directory)")
    args = p.parse_args()
    reports = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        path = Path(path)
        reports[name] = json.loads((path / "report.json" if path.is_dir() else path).read_text())
    stages: list[str] = []
    for rep in reports.values():
        stages += [k for k in rep["seconds"] if k not in stages and k != "total"]
    rows = [[s] + [f"{rep['seconds'][s]:.1f}" if s in rep["seconds"] else "-" for rep in reports.values()] for s in stages]
    rows.append(["**total**"] + [f"**{rep['seconds']['total']:.1f}**" for rep in reports.values()])
    rows.append(["FLOPs reduction"] + [f"{100 * rep['flops']['reduction']:.2f}%" for rep in reports.values()])
    rows.append(["top-1 drop (pp)"] + [f"{rep['top1']['drop_pp']:.2f}" for rep in reports.values()])
    rows.append(["search epochs"] + [str(rep["search"]["stopped"]["epochs"]) if "stopped" in rep.get("search", {}) else "-" for rep in reports.values()])
    rows.append(["peak RSS (MiB)"] + [f"{max(v['rss'] for v in rep['peak_memory_mib'].values()):.0f}" for rep in reports.values()])
    print(markdown_table(["seconds", *reports], rows))


if __name__ == "__main__":
    main()
