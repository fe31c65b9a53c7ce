"""F-Group (Peng et al., ECCV 2018): the hand-picked filter-group pattern, carried over to any model.

F-Group replaces a conv by a grouped conv holding the whole kernel, then a 1x1 conv. The pattern
SVD-NAS reproduced for ResNet-18 gives the 3x3 convs of the first three stages ``rank`` = 8, 32, 128
filters per group and ``groups = in_channels / rank``, and leaves the last stage alone. Read per
stage s, that is ``8 / 2**s`` groups of the stage's width: ``rank = out_channels / (8 / 2**s)``
(64/8, 128/4, 256/2), ``groups = in_channels / rank``; the rule gives the published ranks and
groups on every ResNet-18 conv, the first conv of each stage included, and carries over to other
widths and models. From the fourth stage on it gives one group (a plain SVD of the same form).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.space import divisors
from svdnas.lowrank.spec import LowRankSpec, family_max_rank
from svdnas.surgery.trace import LayerInfo

STAGE_GROUPS = (8, 4, 2)  # groups of a stage's width, first stages first; 1 after these


class PatternEntry(NamedTuple):
    """A target layer's place in the pattern: its stage and its branch at the published scale."""

    stage: int
    spec: LowRankSpec


def stages(infos: dict[str, LayerInfo], targets: Sequence[str]) -> dict[str, int]:
    """Stage of each target: the rank of its output resolution among the targets', largest first.

    A layer on a globally pooled map (1x1 in and out, like squeeze-and-excitation convs or a
    classifier) has no resolution of its own and takes the stage of the target before it.
    """
    pooled = {n for n in targets if _area(infos[n].input_hw) == 1 and _area(infos[n].output_hw) == 1}
    areas = sorted({_area(infos[n].output_hw) for n in targets if n not in pooled}, reverse=True)
    out: dict[str, int] = {}
    stage = 0
    for name in sorted(targets, key=lambda n: infos[n].order):
        if name not in pooled:
            stage = areas.index(_area(infos[name].output_hw))
        out[name] = stage
    return out


def fgroup_pattern(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str]) -> dict[str, PatternEntry]:
    """Every target's F-Group branch at the published scale, with its stage."""
    out = {}
    for name, stage in stages(infos, targets).items():
        layer = model.get_submodule(name)
        o, i, kh, kw = conv_weight(layer).shape
        stage_groups = STAGE_GROUPS[stage] if stage < len(STAGE_GROUPS) else 1
        rank = max(1, round(o / stage_groups))
        groups = _nearest_divisor(i, i / rank) if isinstance(layer, nn.Conv2d) else 1
        family = LowRankSpec((kh, kw), (groups, 1), 1)
        rank = min(rank, family_max_rank(family, o, i, (kh, kw)))
        out[name] = PatternEntry(stage, family.with_rank(rank))
    return out


def _nearest_divisor(n: int, x: float) -> int:
    """The divisor of ``n`` nearest to ``x`` (the smaller on a tie)."""
    return min(divisors(n), key=lambda d: (abs(d - x), d))


def _area(hw: tuple[int, int]) -> int:
    return hw[0] * hw[1]
