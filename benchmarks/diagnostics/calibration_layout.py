"""The calibration statistics' patch layout: what copying patches with a kernel offset's channels side
by side (offset-major) saves against unfold's column order, what eight column blocks of a symmetric
product save against four, and whether the moments come out the same to the bit on this machine.

    .venv/bin/python -m benchmarks.diagnostics.calibration_layout

Copies are timed on random channels-last batches of 128 images at the shapes of ``zoo:resnet18``'s
3x3 layers (28x28x32 .. 4x4x256), products on 16,384 of those patches (repeated where there are fewer),
the median of ``--repeats`` after one warm-up.
The moments are those of :class:`~svdnas.lowrank.calibration.PatchMoments` and ``CrossMoments``
(offset-major where they may be) against the same sums taken here in unfold's order, over strides,
first-layer groups, sampling and 3x3 / 5x5 kernels. Writes
benchmarks/results/calibration_layout/layout.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from benchmarks.common import markdown_table, parser, result_path, setup, stamp, write_json
from svdnas.cost.timer import measure
from svdnas.lowrank import calibration
from svdnas.lowrank.calibration import CrossMoments, PatchMoments, Sampling, gram, patches, take_rows, unfolded
from svdnas.lowrank.geometry import layer_geometry

SHAPES = [(32, 28), (64, 14), (128, 7), (256, 4)]  # (channels, side) of the 3x3 layers' inputs
ROWS = 16384  # patches per timed product


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    return measure(fn, warmup=1, repeats=repeats)["median_ms"]


@contextmanager
def column_blocks(parts: int) -> Iterator[None]:
    """:func:`~svdnas.lowrank.calibration.gram` taking a symmetric product in ``parts`` column blocks."""
    before = calibration._COLUMN_BLOCKS
    calibration._COLUMN_BLOCKS = parts
    try:
        yield
    finally:
        calibration._COLUMN_BLOCKS = before


def gram_in_blocks(left: torch.Tensor, parts: int) -> torch.Tensor:
    """``left^T left`` by :func:`~svdnas.lowrank.calibration.gram` in ``parts`` column blocks."""
    with column_blocks(parts):
        return gram(left)


def unfold_order_moment(conv, fk, groups: int, batches, sampling: Sampling | None, *, within_full: bool = False) -> torch.Tensor:
    """E[p p^T] per first-layer group as the statistics summed it in unfold's column order: each batch's
    kept patches (every ``step``-th of the stream) in float32, their products summed in float64 by
    :func:`~svdnas.lowrank.calibration.gram`; for a block of the full moment, the full one's rows and
    columns at the sub-patch's columns. The batches must be small enough to be one chunk each."""
    geo = layer_geometry(conv)
    unfolding = geo.kernel if within_full else fk
    acc, count, streamed = None, 0, 0
    for x in batches:
        view = unfolded(x, geo, unfolding)
        positions, columns = view.shape[1] * view.shape[2], view[0, 0, 0].numel()
        start, step = 0, 1
        if sampling is not None:
            step = sampling.step(positions, columns)
            start, streamed = -streamed % step, streamed + view.shape[0] * positions
        p = take_rows(view, start, step).float()
        count += len(p)
        g = 1 if within_full else groups
        n = columns // g
        acc = torch.zeros(g, n, n, dtype=torch.float64) if acc is None else acc
        for j in range(g):
            gram(p[:, j * n : (j + 1) * n], out=acc[j])
    if within_full:
        kh, kw = geo.kernel
        rows = torch.arange(kh) if fk[0] == kh else torch.tensor([kh // 2])
        cols = torch.arange(kw) if fk[1] == kw else torch.tensor([kw // 2])
        idx = (torch.arange(geo.in_channels).view(-1, 1, 1) * kh * kw + rows.view(1, -1, 1) * kw + cols.view(1, 1, -1)).flatten()
        full = acc[0][idx][:, idx]
        n = len(idx) // groups
        return torch.stack([full[j * n : (j + 1) * n, j * n : (j + 1) * n] for j in range(groups)]) / count
    return acc / count


def in_unfold_order(conv, families, full, sampling, xs, x_comps) -> dict[str, bool]:
    """Whether each moment of both streams equals, to the bit, the one summed in unfold's order."""
    stats = PatchMoments(conv, families, full=full, sampling=sampling)
    cross = CrossMoments(conv, families, sampling=sampling)
    for x, xc in zip(xs, x_comps):
        stats.update(x)
        cross.update(x, xc)
    same = {}
    for name, ours, inputs, read in (("stats", stats, xs, stats.moment), ("cross", cross, x_comps, cross.comp)):
        for fk, g in families:
            ref = unfold_order_moment(conv, fk, g[0], inputs, sampling, within_full=fk in ours.within_full)
            same[f"{name} {fk} g{g[0]}"] = torch.equal(read(fk, g[0]), ref)
    return same


def main() -> None:
    p = parser(__doc__, model=None, data=None, out="JSON to write (default benchmarks/results/calibration_layout/layout.json)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    setup(args)
    g = torch.Generator().manual_seed(args.seed)
    copies, products = [], []
    for channels, side in SHAPES:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(128, channels, side, side, generator=g).relu().contiguous(memory_format=torch.channels_last)
        view, width = unfolded(x, layer_geometry(conv)), channels * 9
        unfold_ms = timed(lambda v=view, w=width: v.reshape(-1, w), args.repeats)
        offset_ms = timed(lambda v=view, w=width: v.permute(0, 1, 2, 4, 5, 3).reshape(-1, w), args.repeats)
        copies.append({"channels": channels, "side": side, "unfold_order_ms": unfold_ms, "offset_major_ms": offset_ms})
        every = patches(x, layer_geometry(conv))
        rows = every.repeat(-(-ROWS // len(every)), 1)[:ROWS]  # as many rows at every width
        four, eight = (timed(lambda k=k, r=rows: gram_in_blocks(r, k), args.repeats) for k in (4, 8))
        products.append({"columns": channels * 9, "rows": len(rows), "four_blocks_ms": four, "eight_blocks_ms": eight,
                         "same": torch.equal(gram_in_blocks(rows, 4), gram_in_blocks(rows, 8))})
    checks = {}
    cases = {
        "3x3 stride 1, sub-patches, sampled": ((24, 3, 1, 1), [((3, 3), (1, 1)), ((1, 3), (1, 1)), ((3, 1), (2, 1)), ((1, 1), (1, 1))], True, 8),
        "3x3 stride (1, 2)": ((32, 3, (1, 2), 1), [((3, 3), (1, 1)), ((1, 3), (1, 1)), ((3, 1), (2, 1))], True, None),
        "3x3 stride 2, grouped only": ((64, 3, 2, 1), [((3, 3), (2, 1)), ((3, 1), (1, 1))], False, None),
        "5x5": ((16, 5, 1, 2), [((5, 5), (1, 1)), ((5, 1), (1, 1)), ((1, 5), (2, 1))], True, None),
    }
    for name, ((channels, k, stride, pad), families, full, per_column) in cases.items():
        conv = torch.nn.Conv2d(channels, channels + 8, k, stride=stride, padding=pad)
        xs = [torch.randn(32, channels, 14, 14, generator=g).relu() for _ in range(2)]
        x_comps = [x + 0.05 * torch.randn(x.shape, generator=g) for x in xs]
        sampling = Sampling(64, per_column) if per_column else None
        checks[name] = in_unfold_order(conv, families, full, sampling, xs, x_comps)
    write_json(args.out or result_path("calibration_layout", "layout.json"),
               {"meta": {"repeats": args.repeats, **stamp(args.threads)}, "copies": copies, "products": products, "same_to_the_bit": checks})
    print(markdown_table(["input", "copy in unfold's order (ms)", "offset-major (ms)"],
                         [[f"128x{c['channels']}x{c['side']}x{c['side']}", f"{c['unfold_order_ms']:.1f}", f"{c['offset_major_ms']:.1f}"] for c in copies]))
    print()
    print(markdown_table(["columns x rows", "four blocks (ms)", "eight blocks (ms)", "equal to the bit"],
                         [[f"{q['columns']} x {q['rows']}", f"{q['four_blocks_ms']:.1f}", f"{q['eight_blocks_ms']:.1f}", str(q["same"])] for q in products]))
    print()
    for name, same in checks.items():
        different = [k for k, v in same.items() if not v]
        print(f"{name}: {len(same) - len(different)} of {len(same)} equal to the bit" + (f" (not: {', '.join(different)})" if different else ""))


if __name__ == "__main__":
    main()
