"""Latency as the search's cost: each candidate's latency from the lookup table, the whole
model's measured latency as the total, and what a plan is predicted to take.

The search and the selection see latencies in nanoseconds: the paper's loss takes ``log F``, and on
that scale a model of a few milliseconds has a ``log F0`` close to that of its MACs, so values of
``--beta`` mean about what they mean for FLOPs. Everything outside the target layers (the other
layers, activations, additions, pooling, framework overhead) is the measured whole-model latency
minus the table's latencies of the target layers; it does not change with the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from svdnas import distributed as ddp
from svdnas.cost.table import NOISY, LatencyTable
from svdnas.lowrank.spec import LowRankSpec
from svdnas.search.candidates import LayerCandidates

log = logging.getLogger(__name__)
NS_PER_MS = 1e6


@dataclass
class LatencyCosts:
    """The totals of the latency objective (nanoseconds, as the search uses them).

    Attributes:
        total: the original model's latency as the search sees it (F0).
        fixed: the part of ``total`` outside the target layers.
        whole_model_ms: the original model's measured latency.
        targets_ms: the table's latencies of the target layers, summed.
        table: what the lookup table did (:meth:`LatencyTable.summary`).
    """

    total: float
    fixed: float
    whole_model_ms: float
    targets_ms: float
    table: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"whole_model_ms": self.whole_model_ms, "target_layers_ms": self.targets_ms,
                "rest_ms": self.fixed / NS_PER_MS, "table": self.table}


def _candidate_specs(cands: LayerCandidates) -> list[list[LowRankSpec]]:
    return [cands.branches(i) for i in range(len(cands))]


def _measure(model: nn.Module, input_shape: Sequence[int] | None, candidates: dict[str, LayerCandidates],
             table: LatencyTable) -> tuple[float | None, dict[str, Any]]:
    """Fill each ``LayerCandidates.latency`` from ``table`` (and, given ``input_shape``, measure the
    whole model); the whole model's milliseconds (None without a shape) and the table's summary.

    Under torchrun only rank 0 measures (the processes would disturb each other's timings), and the
    others receive its figures, so that every process searches with the same costs.
    """
    figures = None
    if ddp.is_main():
        per_layer = {name: table.candidates(model.get_submodule(name), cands.input_hw, _candidate_specs(cands))
                     for name, cands in candidates.items()}
        whole = table.model(model, input_shape) if input_shape is not None else None
        table.save()
        figures = (per_layer, whole, table.summary())
    per_layer, whole, summary = ddp.broadcast_object(figures)
    for name, ms in per_layer.items():
        candidates[name].latency = [t * NS_PER_MS for t in ms]
    if summary["noisy"]:
        log.warning(
            "%d of %d latency timings were disturbed (slowest tenth over %.0fx the fastest): other processes "
            "compete for the cores; delete %s to measure again on a quiet machine",
            summary["noisy"], summary["measured"], NOISY, summary["cache"],
        )
    return whole, summary


def attach_latency(model: nn.Module, input_shape: Sequence[int], candidates: dict[str, LayerCandidates], table: LatencyTable) -> LatencyCosts:
    """Fill each ``LayerCandidates.latency`` from ``table`` and measure the whole model."""
    whole, summary = _measure(model, input_shape, candidates, table)
    assert whole is not None
    targets = sum(cands.latency[0] for cands in candidates.values() if cands.latency is not None) / NS_PER_MS
    if targets > whole:
        log.warning(
            "the target layers alone measure %.3f ms, more than the whole model's %.3f ms (noise, or caches "
            "that favour the model); taking the rest of the model as free", targets, whole,
        )
    rest = max(whole - targets, 0.0)
    log.info(
        "latency table: %d entries, %d measured in %.1f s; model %.3f ms, target layers %.3f ms",
        summary["entries"], summary["measured"], summary["measure_seconds"], whole, targets,
    )
    return LatencyCosts((rest + targets) * NS_PER_MS, rest * NS_PER_MS, whole, targets, summary)


def offer_only_faster(model: nn.Module, candidates: dict[str, LayerCandidates], table: LatencyTable) -> dict[str, Any]:
    """Under a FLOPs or params objective: time every candidate and its original layer in ``table``
    and remove, in place, the candidates no faster than their layer (a plan of fewer FLOPs can be
    slower where it runs); the table's summary with ``slower_dropped``. The latencies stay on the
    candidates; the search's costs remain the objective's."""
    _, summary = _measure(model, None, candidates, table)
    summary["slower_dropped"] = drop_slower(candidates)
    return summary


def drop_slower(candidates: dict[str, LayerCandidates]) -> int:
    """Remove, in place, every candidate the table measures no faster than its original layer (the
    original itself is always offered; a layer left with none is removed, and so kept as it is);
    the number of candidates removed."""
    removed = 0
    for name, cands in list(candidates.items()):
        if cands.latency is None:
            continue
        faster = {s for s, t in zip(cands.specs, cands.latency[1:]) if t < cands.latency[0]}
        removed += len(cands.specs) - len(faster)
        if faster:
            candidates[name] = cands.subset(lambda spec, keep=faster: spec in keep)
        else:  # nothing left to choose: the layer stays as it is, its cost outside the search
            del candidates[name]
    if removed:
        log.info("latency table: %d candidates measured no faster than their original layer are not offered", removed)
    return removed


def _cost_of(cands: LayerCandidates, specs: Sequence[LowRankSpec]) -> float | None:
    options = _candidate_specs(cands)
    return cands.cost("latency")[options.index(list(specs))] if list(specs) in options else None


def attach_second_branch(
    model: nn.Module,
    second: dict[str, LayerCandidates],
    first: dict[str, LayerCandidates],
    chosen: dict[str, list[LowRankSpec]],
    costs: LatencyCosts,
    table: LatencyTable,
) -> float:
    """Latencies of the second search's candidates (first branch fixed, second branch added);
    returns the latency (ns) of everything outside the second search, with the layers it leaves
    at what the first search ``chosen`` for them."""
    figures = None
    if ddp.is_main():
        before = table.measured, table.seconds
        figures = {n: table.candidates(model.get_submodule(n), c.input_hw, _candidate_specs(c)) for n, c in second.items()}
        table.save()
        figures = (figures, table.measured - before[0], table.seconds - before[1])
    per_layer, measured, seconds = ddp.broadcast_object(figures)
    for name, ms in per_layer.items():
        second[name].latency = [t * NS_PER_MS for t in ms]
    costs.table = costs.table | {"measured": costs.table["measured"] + measured, "measure_seconds": costs.table["measure_seconds"] + seconds}
    outside = costs.fixed
    for name, cands in first.items():
        if name not in second:
            cost = _cost_of(cands, chosen.get(name, cands.base))
            assert cost is not None, f"{name}: the first search chose outside its candidates"
            outside += cost
    return outside


def predicted_latency(
    stages: Sequence[dict[str, LayerCandidates]], chosen: dict[str, list[LowRankSpec]], costs: LatencyCosts
) -> float:
    """Predicted latency (ms) of the model with ``chosen`` branches, from the candidates of the
    searches in ``stages`` (later searches first): what the selection counted."""
    total = costs.fixed
    for name in stages[0]:
        specs = chosen.get(name, stages[0][name].base)
        cost = next((c for stage in reversed(stages) if name in stage and (c := _cost_of(stage[name], specs)) is not None), None)
        if cost is None:
            raise ValueError(f"{name}: {specs} is not one of its candidates")
        total += cost
    return total / NS_PER_MS


def predicted_report(
    stages: Sequence[dict[str, LayerCandidates]], chosen: dict[str, list[LowRankSpec]], costs: LatencyCosts
) -> dict[str, Any]:
    """The report's predicted latency of a plan, beside where the prediction came from."""
    after = predicted_latency(stages, chosen, costs)
    before = costs.total / NS_PER_MS
    return {"original_ms": before, "compressed_ms": after, "reduction": 1 - after / before, **costs.to_dict()}
