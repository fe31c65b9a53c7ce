"""``svdnas report``: report.md and PNG plots of a run directory, written into it."""

from __future__ import annotations

import argparse

from svdnas.cli.common import add_common
from svdnas.errors import SpecError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report.md and PNG plots of a run directory")
    p.add_argument("dir", help="a run directory written by compress, baseline or finetune")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svdnas.report.plots import write_report
    from svdnas.runs.directory import is_run_dir

    if not is_run_dir(args.dir):  # the report's files go into DIR: only into a run's
        raise SpecError(f"{args.dir} is not a run directory of svdnas; report writes its files only into one")
    for path in write_report(args.dir):
        print(path)
    return 0
