"""The LR-space of a layer: every kernel split, grouping and rank whose parameters stay below the original's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch import nn

from svdnas.lowrank.geometry import ConvGeometry, conv_geometry, layer_geometry
from svdnas.lowrank.spec import LowRankSpec, family_max_rank


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def kernel_splits(kernel: tuple[int, int]) -> list[tuple[int, int]]:
    """Every first-layer kernel: per dimension 1 or the kernel size (one split for a 1x1 kernel)."""
    return [tuple(a) for a in itertools.product(*[(1, k) if k > 1 else (1,) for k in kernel])]  # type: ignore[misc]


def groupings(in_channels: int, out_channels: int) -> list[tuple[int, int]]:
    """(1, 1), then groups on the first layer (divisors of in_channels), then on the second."""
    return [(1, 1)] + [(g, 1) for g in divisors(in_channels)[1:]] + [(1, g) for g in divisors(out_channels)[1:]]


def families(geo: ConvGeometry) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every (first_kernel, groups) pair of a layer; a family's members differ only in rank."""
    return [(a, g) for a in kernel_splits(geo.kernel) for g in groupings(geo.in_channels, geo.out_channels)]


def family_ranks(geo: ConvGeometry, family: tuple[tuple[int, int], tuple[int, int]]) -> range:
    """Ranks 1..r_max of a family whose branch has fewer parameters than the original layer.

    Parameters grow linearly with rank, so the admissible ranks form a prefix.
    """
    spec = LowRankSpec(family[0], family[1], 1)
    original = geo.out_channels * geo.in_channels * geo.kernel[0] * geo.kernel[1]
    per_rank = sum(geo.branch_params(spec))
    limit = min(family_max_rank(spec, geo.out_channels, geo.in_channels, geo.kernel), (original - 1) // per_rank)
    return range(1, limit + 1)


def enumerate_space(layer: nn.Module) -> Iterator[LowRankSpec]:
    """Every single-branch candidate of ``layer`` (nn.Conv2d with groups=1, or nn.Linear)."""
    if isinstance(layer, nn.Linear):
        geo = layer_geometry(layer)
        fams = [((1, 1), (1, 1))]
    else:
        geo = conv_geometry(layer)
        fams = families(geo)
    for fam in fams:
        for r in family_ranks(geo, fam):
            yield LowRankSpec(fam[0], fam[1], r)


def count_space(layer: nn.Module) -> int:
    """Number of single-branch candidates of ``layer``."""
    if isinstance(layer, nn.Linear):
        return len(list(enumerate_space(layer)))
    geo = conv_geometry(layer)
    return sum(len(family_ranks(geo, fam)) for fam in families(geo))


__all__ = ["count_space", "divisors", "enumerate_space", "families", "family_ranks", "groupings", "kernel_splits"]
