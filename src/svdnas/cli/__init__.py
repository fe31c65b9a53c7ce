"""The ``svdnas`` command line: a thin layer that builds the library's configs from options and calls it.

One module per command (``compress``, ``baseline``, ``eval``, ``synth``, ``finetune``, ``export``,
``latency``, ``report``, ``space``), each with ``add_parser(sub)`` and ``run(args)``; what they share
is in :mod:`svdnas.cli.common`, and the options of the config dataclasses are made from their
fields by :mod:`svdnas.cli.options`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from svdnas.cli import baseline, compress, eval, export, finetune, latency, report, space, synth
from svdnas.cli.common import Parser, apply_config
from svdnas.cli.process import one_malloc_arena
from svdnas.errors import SvdnasError

COMMANDS = (eval, compress, synth, finetune, baseline, report, export, latency, space)


def build_parser() -> argparse.ArgumentParser:
    from svdnas import __version__

    parser = Parser(prog="svdnas", description="Low-rank compression of CNNs found by neural architecture search (SVD-NAS).")
    parser.add_argument("--version", action="version", version=f"svdnas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _one_line(message: str) -> str:
    """A message that spans lines (some libraries' do) as the one line the contract promises."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line: ``argv`` (a Python caller's list), or None for this process's own arguments,
    which also makes the process's settings (:mod:`svdnas.cli.process`)."""
    if argv is None:
        one_malloc_arena()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if getattr(args, "config", None):
            sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
            args = apply_config(parser, sub, argv, args)
        torch.manual_seed(args.seed)
        return args.func(args)
    except (SvdnasError, OSError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
