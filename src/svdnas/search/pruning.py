"""The two prunings of the LR-space before the search: families by their output error, candidates by a
one-layer accuracy proxy. Both can checkpoint what they measured, so that a resumed run skips them."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from svdnas import distributed as ddp
from svdnas.errors import SpecError
from svdnas.fileio import atomic_write_json
from svdnas.lowrank.derivation import Derivation
from svdnas.search.accuracy_proxy import PrefixRecording, ProxyResult, measure_drops, passing
from svdnas.search.budget import cheapest_total
from svdnas.search.candidates import LayerCandidates
from svdnas.search.output_proxy import capture_inputs, output_errors

log = logging.getLogger(__name__)


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _offered(candidates: dict[str, LayerCandidates]) -> str:
    """A digest of each layer's candidates (the strings of their branches, in order): what a
    checkpoint's indices refer to (two sets of the same sizes, timed or pruned differently, must not
    share one)."""
    offered = {n: ["+".join(map(str, c.branches(i))) for i in range(len(c))] for n, c in candidates.items()}
    return hashlib.sha256(json.dumps(offered, sort_keys=True).encode()).hexdigest()


def proxy_errors(
    model: nn.Module, candidates: dict[str, LayerCandidates], proxy_set, kept: float, device, checkpoint: Path | None, progress,
    derivation: Derivation | None = None, objective: str = "flops",
) -> dict[str, dict[tuple, float]]:
    """Per layer, the output error of each family near the target (see :mod:`svdnas.search.output_proxy`).

    With a ``checkpoint`` file the errors are written there (atomically) when done and read back by
    a resumed run, which then skips the stage.
    """

    names = list(candidates)
    if checkpoint is not None and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        kind = derivation.kind if derivation is not None else "weight"
        if saved.get("names") == names and saved.get("kept") == kept and saved.get("derivation", "weight") == kind and saved.get("objective", objective) == objective:
            log.info("output-error proxy: reusing %s", checkpoint)
            return {n: {_tuples(f): e for f, e in saved["errors"][n]} for n in names}
    # an output-aware derivation reads the errors from its spectra: no image is needed
    measured = derivation is None or derivation.plain
    inputs = capture_inputs(model, names, proxy_set, device) if measured else {}
    errors = {}
    for i, name in enumerate(names):
        errors[name] = output_errors(model.get_submodule(name), inputs.pop(name, None), candidates[name], kept, derivation, objective)
        if progress is not None:
            progress("proxy", i + 1, len(names))
    if checkpoint is not None and ddp.is_main():
        atomic_write_json(checkpoint, {
            "names": names, "kept": kept, "derivation": derivation.kind if derivation is not None else "weight", "objective": objective, "errors": {n: [[f, e] for f, e in errs.items()] for n, errs in errors.items()}})
    return errors


def accuracy_prune(
    model: nn.Module, candidates: dict[str, LayerCandidates], proxy_set, proxy_drop: float, objective: str,
    reduction: float | None, total: float, device, checkpoint: Path | None, progress, derivation: Derivation | None = None,
) -> tuple[dict[str, LayerCandidates], dict[str, Any]]:
    """Removes the candidates whose layer, compressed alone, loses more than ``proxy_drop``
    points of top-1 on the proxy images (see :mod:`svdnas.search.accuracy_proxy`).

    While what is left cannot meet the budget, the threshold doubles. With a ``checkpoint`` the
    measured drops are saved after every layer and a resumed run measures only what is missing.
    Layers left with no candidate keep their original form.
    """

    names = list(candidates)
    measured: dict[str, ProxyResult] = {}
    if checkpoint is not None and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        kind = derivation.kind if derivation is not None else "weight"
        if saved.get("candidates") == _offered(candidates) and saved.get("derivation", "weight") == kind:
            log.info("accuracy proxy: reusing the drops measured in %s", checkpoint)
            measured = {
                n: ProxyResult(n, r["original_top1"], {int(i): d for i, d in r["drops"].items()}, set(r.get("bounds", [])))
                for n, r in saved["layers"].items()
            }
    # one recording of the proxy images shared by every layer (what the candidates replay)
    recording = PrefixRecording(model, proxy_set, device, names)
    threshold = proxy_drop
    while True:
        for k, name in enumerate(names):
            result = measure_drops(
                model, candidates[name], None, device, threshold, known=measured.get(name), recording=recording, derivation=derivation,
            )
            if name not in measured or (result.drops, result.bounds) != (measured[name].drops, measured[name].bounds):
                measured[name] = result
                if checkpoint is not None and ddp.is_main():
                    atomic_write_json(checkpoint, {
                        "candidates": _offered(candidates),
                        "derivation": derivation.kind if derivation is not None else "weight",
                        "layers": {
                            n: {"original_top1": r.original_top1, "drops": {str(i): d for i, d in r.drops.items()}, "bounds": sorted(r.bounds)}
                            for n, r in measured.items()
                        },
                    })
            if progress is not None:
                progress("accuracy proxy", k + 1, len(names))
        kept = {}
        for name in names:
            cands = candidates[name]
            ids = {id(cands.specs[i - 1]) for i in passing(cands, measured[name], threshold)}
            kept[name] = cands.subset(lambda s, ids=ids: id(s) in ids)
        floor = cheapest_total({n: c.cost(objective) for n, c in kept.items()}, total)
        if reduction is None or floor <= (1 - reduction) * total or threshold >= 100:
            break
        log.warning(
            "accuracy proxy: the candidates within %.3g points of top-1 cannot remove %.3g of the cost; trying %.3g points",
            threshold, reduction, 2 * threshold,
        )
        threshold = min(100.0, 2 * threshold)
    before = sum(len(c) - 1 for c in candidates.values())
    after = {n: c for n, c in kept.items() if c.specs}
    summary = {
        "threshold_pp": proxy_drop, "threshold_used_pp": threshold, "images": len(proxy_set),
        "evaluated": sum(len(r.drops) for r in measured.values()), "stopped_early": sum(len(r.bounds) for r in measured.values()),
        "shared_recording": bool(recording.kept), "candidates_before": before,
        "candidates_after": sum(len(c) - 1 for c in after.values()),
        "layers_left_original": [n for n in names if n not in after],
    }
    if not after:
        raise SpecError(f"every candidate loses more than {threshold:g} points of top-1 on its own; raise --proxy-drop or pass --proxy-drop 0")
    log.info("accuracy proxy: %d of %d candidates within %.3g points (%d measured)", summary["candidates_after"], before, threshold, summary["evaluated"])
    return after, summary
