"""Markdown tables of the post-training comparison's JSON files (what RESULTS.md and the README show).

    .venv/bin/python -m benchmarks.tools.summarize benchmarks/results/post_training_comparison/zoo_*.json

One table per file: top-1 drop (pp) of every method at every reduction target, the best value of
each column in bold, and per column whether svdnas is ahead of the best baseline and by how much.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import parser, post_training_table

table = post_training_table


def main() -> None:
    p = parser(__doc__, model=None, data=None, threads=None, seed=None)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    print("\n\n".join(post_training_table(f) for f in args.files))


if __name__ == "__main__":
    main()
