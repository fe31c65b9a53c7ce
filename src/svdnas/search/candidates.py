"""A target layer's candidates after pruning by the FLOPs grid, with their costs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from svdnas.cost.counting import layer_cost
from svdnas.lowrank.geometry import layer_geometry
from svdnas.lowrank.space import families, family_ranks
from svdnas.lowrank.spec import LowRankSpec

Family = tuple[tuple[int, int], tuple[int, int]]


@dataclass
class LayerCandidates:
    """The candidates of one target layer; index 0 of ``costs``/``params`` is the original layer.

    Attributes:
        name: dotted module name.
        input_hw: spatial size of the layer's input.
        specs: the low-rank candidates (each a single branch, or a list of branches for the
            second search of the residual extension).
        macs, params: per candidate, original first.
        prefix: branches fixed before this search (empty for the first branch).
        base: what index 0 stands for: empty for the original layer, else branches (the second
            search's "keep the first branch as it was").
        latency: per candidate, measured latency in nanoseconds (filled in for the latency
            objective by :func:`svdnas.search.latency_costs.attach_latency`).
    """

    name: str
    input_hw: tuple[int, int]
    specs: list[LowRankSpec]
    macs: list[int]
    params: list[int]
    prefix: list[LowRankSpec] = field(default_factory=list)
    base: list[LowRankSpec] = field(default_factory=list)
    latency: list[float] | None = None

    def __len__(self) -> int:
        return len(self.specs) + 1

    def branches(self, index: int) -> list[LowRankSpec]:
        """The layer's branches when candidate ``index`` is chosen (0: ``base``)."""
        return list(self.base) if index == 0 else [*self.prefix, self.specs[index - 1]]

    def cost(self, objective: str) -> list[float]:
        if objective == "latency":
            if self.latency is None:
                raise ValueError(f"{self.name}: latencies not measured yet (attach_latency)")
            return list(self.latency)
        return [float(c) for c in (self.params if objective == "params" else self.macs)]

    def subset(self, keep: Callable[[LowRankSpec], bool]) -> LayerCandidates:
        """The candidates for which ``keep(spec)`` holds (the original always stays)."""
        idx = [i for i, s in enumerate(self.specs) if keep(s)]
        return LayerCandidates(
            self.name, self.input_hw, [self.specs[i] for i in idx], [self.macs[0]] + [self.macs[i + 1] for i in idx],
            [self.params[0]] + [self.params[i + 1] for i in idx], self.prefix, self.base,
            None if self.latency is None else [self.latency[0]] + [self.latency[i + 1] for i in idx],
        )

    def next_rank(self) -> list[int | None]:
        """Per candidate index (0: original), the index of the next larger rank of its family
        (the original after the largest), or None for the original."""
        out: list[int | None] = [None]
        for i, spec in enumerate(self.specs, start=1):
            higher = [j for j, s in enumerate(self.specs, start=1) if s.family() == spec.family() and s.rank > spec.rank]
            out.append(min(higher, key=lambda j: self.specs[j - 1].rank) if higher else 0)
        return out

    def families(self) -> list[Family]:
        seen: dict[Family, None] = {}
        for s in self.specs:
            seen.setdefault(s.family(), None)
        return list(seen)


def grid_candidates(
    name: str,
    layer: nn.Module,
    input_hw: tuple[int, int],
    fractions: Sequence[float],
    objective: str = "flops",
    prefix: Sequence[LowRankSpec] = (),
    rank_multiple: int = 1,
) -> LayerCandidates:
    """Candidates whose cost is near ``fractions`` of the original layer's (the paper's FLOPs grid).

    For each family and fraction f the rank is ``floor(f * cost0 / cost per unit of rank)``;
    ranks outside the family's admissible range (fewer parameters than the layer, at most
    full rank) are dropped, and duplicates merged. With ``prefix``, the candidates are second
    branches added after those fixed branches, and the fractions are of the original layer.
    With ``rank_multiple`` above 1, each rank is rounded to the nearest multiple of it and only
    candidates whose convolutions the runtime's blocked kernels take are offered (:func:`blocked`).
    """
    geo = layer_geometry(layer)
    macs0, params0 = layer_cost(layer, input_hw)
    base_macs, base_params = layer_cost(layer, input_hw, list(prefix)) if prefix else (0, 0)
    fams = [((1, 1), (1, 1))] if isinstance(layer, nn.Linear) else families(geo)
    specs: list[LowRankSpec] = []
    for fam in fams:
        admissible = family_ranks(geo, fam)
        if not admissible:
            continue
        unit = LowRankSpec(fam[0], fam[1], 1)
        m1, p1 = layer_cost(layer, input_hw, [*prefix, unit])
        per_rank = (p1 - base_params) if objective == "params" else (m1 - base_macs)
        per_rank -= (geo.out_channels if geo.bias and not prefix and objective == "params" else 0)
        total = params0 if objective == "params" else macs0
        ranks = sorted({int(f * total // per_rank) for f in fractions})
        if rank_multiple > 1:
            ranks = sorted({r if r >= 1 and blocked(unit.with_rank(r), geo.in_channels, geo.out_channels, rank_multiple)
                            else max(rank_multiple, rank_multiple * round(r / rank_multiple)) for r in ranks})
            ranks = [r for r in ranks if blocked(unit.with_rank(r), geo.in_channels, geo.out_channels, rank_multiple)]
        specs += [unit.with_rank(r) for r in ranks if r in admissible]
    macs = [macs0]
    params = [params0]
    for s in specs:
        m, p = layer_cost(layer, input_hw, [*prefix, s])
        macs.append(m)
        params.append(p)
    return LayerCandidates(name, input_hw, specs, macs, params, list(prefix))


def blocked(spec: LowRankSpec, in_channels: int, out_channels: int, multiple: int) -> bool:
    """Whether both convolutions of ``spec`` keep channel counts that are multiples of ``multiple``
    per group (a depthwise first layer of rank 1 counts too), so that a runtime computing in
    channel blocks of that size (ONNX Runtime's NCHWc layout on a CPU) runs them without reordering
    the tensors around them. Measured on this project's CPU: a block whose middle has fewer than 16
    channels, or groups of 8 channels, adds two Reorder nodes and, over a whole ResNet-18, made the
    compressed model 20 points less faster (``benchmarks/diagnostics/rank_multiple.py``)."""
    if multiple <= 1:
        return True
    g1, g2 = spec.groups
    if spec.rank % multiple:
        return g1 == in_channels and spec.rank == 1  # depthwise
    if g1 > 1:
        return (in_channels // g1) % multiple == 0
    if g2 > 1:
        return (out_channels // g2) % multiple == 0
    return True


def fraction_grid(start: float, stop: float, step: float = 0.05) -> list[float]:
    """[start, start + step, ..., stop] without float drift."""
    n = round((stop - start) / step)
    return [round(start + i * step, 6) for i in range(n + 1)]


def limit_groups(cands: LayerCandidates, max_groups: int | None) -> LayerCandidates:
    """Only the candidates with at most ``max_groups`` groups (all when None)."""
    if max_groups is None:
        return cands
    return cands.subset(lambda s: s.num_groups <= max_groups)
