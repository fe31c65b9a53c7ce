"""One branch of a low-rank approximation: which layer holds each kernel dimension, groups, rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from svdnas.errors import SpecError


@dataclass(frozen=True)
class LowRankSpec:
    """One branch of the LR-space.

    Attributes:
        first_kernel: kernel of the first layer, per spatial dimension either 1 or the original
            kernel size; the second layer holds the rest.
        groups: (groups of the first layer, groups of the second layer); at most one above 1.
        rank: rank per group; the two layers are joined by ``max(groups) * rank`` channels.
    """

    first_kernel: tuple[int, int]
    groups: tuple[int, int] = (1, 1)
    rank: int = 1

    def __post_init__(self) -> None:
        fk, g = tuple(self.first_kernel), tuple(self.groups)
        if len(fk) != 2 or any(not isinstance(k, int) or k < 1 for k in fk):
            raise SpecError(f"first_kernel must be two positive ints, got {self.first_kernel!r}")
        if len(g) != 2 or any(not isinstance(x, int) or x < 1 for x in g):
            raise SpecError(f"groups must be two positive ints, got {self.groups!r}")
        if min(g) != 1:
            raise SpecError(f"groups on both layers is not allowed (groups={g}): one of them must be 1")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(f"rank must be a positive int, got {self.rank!r}")
        object.__setattr__(self, "first_kernel", fk)
        object.__setattr__(self, "groups", g)

    @property
    def num_groups(self) -> int:
        return max(self.groups)

    @property
    def width(self) -> int:
        """Channels between the two layers."""
        return self.num_groups * self.rank

    def with_rank(self, rank: int) -> LowRankSpec:
        return LowRankSpec(self.first_kernel, self.groups, rank)

    def family(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(first_kernel, groups): candidates of one family share one SVD and differ in rank only."""
        return self.first_kernel, self.groups

    def to_dict(self) -> dict[str, Any]:
        return {"first_kernel": list(self.first_kernel), "groups": list(self.groups), "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LowRankSpec:
        try:
            return cls(tuple(d["first_kernel"]), tuple(d["groups"]), d["rank"])  # type: ignore[arg-type]
        except (KeyError, TypeError) as e:
            raise SpecError(f"a branch needs first_kernel, groups and rank: {d!r}") from e

    def __str__(self) -> str:
        g = f"g{self.groups[0]}x1" if self.groups[0] > 1 else (f"1xg{self.groups[1]}" if self.groups[1] > 1 else "g1")
        return f"{self.first_kernel[0]}x{self.first_kernel[1]}-first/{g}/r{self.rank}"


def check_spec(spec: LowRankSpec, out_channels: int, in_channels: int, kernel: tuple[int, int]) -> int:
    """Check ``spec`` against a layer's shape; return the largest rank its family allows.

    Raises:
        SpecError: naming the rule broken.
    """
    for d, (a, k) in enumerate(zip(spec.first_kernel, kernel)):
        if a not in (1, k):
            raise SpecError(f"first_kernel[{d}]={a} must be 1 or the kernel size {k}")
    g1, g2 = spec.groups
    if in_channels % g1:
        raise SpecError(f"first-layer groups {g1} do not divide the {in_channels} input channels")
    if out_channels % g2:
        raise SpecError(f"second-layer groups {g2} do not divide the {out_channels} output channels")
    max_rank = family_max_rank(spec, out_channels, in_channels, kernel)
    if spec.rank > max_rank:
        raise SpecError(f"rank {spec.rank} is above the maximum {max_rank} of {spec} for this layer")
    return max_rank


def family_max_rank(spec: LowRankSpec, out_channels: int, in_channels: int, kernel: tuple[int, int]) -> int:
    """Full rank of the matrices a family's SVD factorises (rank at which it is exact)."""
    first = spec.first_kernel[0] * spec.first_kernel[1]
    second = (kernel[0] // spec.first_kernel[0]) * (kernel[1] // spec.first_kernel[1])
    rows = out_channels // spec.groups[1] * second
    cols = in_channels // spec.groups[0] * first
    return min(rows, cols)
