"""Modules that a decomposed layer becomes: a branch of two layers, and a block summing branches."""

from __future__ import annotations

from torch import Tensor, nn

from svdnas.lowrank.spec import LowRankSpec


class LowRankBranch(nn.Module):
    """Two consecutive layers (``first`` then ``second``) standing for one branch of the LR-space."""

    def __init__(self, first: nn.Module, second: nn.Module, spec: LowRankSpec) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return str(self.spec)


class LowRankBlock(nn.Module):
    """The sum of one or more branches; each approximates what the branches before it left."""

    def __init__(self, branches: list[LowRankBranch]) -> None:
        super().__init__()
        if not branches:
            raise ValueError("a LowRankBlock needs at least one branch")
        self.branches = nn.ModuleList(branches)

    @property
    def specs(self) -> list[LowRankSpec]:
        return [b.spec for b in self.branches]  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out
