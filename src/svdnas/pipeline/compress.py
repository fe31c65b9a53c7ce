"""The whole compress job as a function: candidates, search, selection, derivation, evaluation, run directory."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas import distributed as ddp
from svdnas.cost.counting import count_params, layer_cost, model_macs
from svdnas.cost.table import LatencyTable
from svdnas.data.datasets import DataBundle, search_subset
from svdnas.data.evaluate import batches, evaluate
from svdnas.errors import BudgetError, DataError, SpecError
from svdnas.fileio import atomic_write_json
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.space import kernel_splits
from svdnas.lowrank.spec import LowRankSpec
from svdnas.models.weights import check_finite
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import (
    SyntheticSplits,
    fidelity,
    obtain_synthetic,
    recover,
    soft_labels,
    split_synthetic,
    synthetic_summary,
)
from svdnas.recovery.synthetic import SynthConfig, require_batchnorm
from svdnas.report.build import build_report
from svdnas.runs.directory import write_run
from svdnas.search import (
    SearchConfig,
    SearchHistory,
    build_supernet,
    fraction_grid,
    grid_candidates,
    search,
    select_within_budget,
    window_dtype,
)
from svdnas.search.accuracy_proxy import PrefixRecording, ProxyResult, measure_drops, passing
from svdnas.search.candidates import LayerCandidates
from svdnas.search.latency_costs import attach_latency, attach_second_branch, predicted_report
from svdnas.search.output_proxy import capture_inputs, keep_families, output_errors
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import FilterFn, require_targets
from svdnas.surgery.trace import example_input, trace_layers

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    history: dict[str, Any] = field(default_factory=dict)


def _limit_groups(cands: LayerCandidates, max_groups: int | None) -> LayerCandidates:
    if max_groups is None:
        return cands
    return cands.subset(lambda s: s.num_groups <= max_groups)


def _down(x: float) -> str:
    """A reachable share rounded down, so that "at most" stays true."""
    return f"{math.floor(x * 1000) / 1000:.3f}"


def _rank_one_reach(model: nn.Module, infos, targets: list[str], config: CompressConfig, total: float) -> float:
    """The largest reduction there is: every target layer at its cheapest rank-1 branch (or left
    as it is where even that costs more)."""
    pick = 1 if config.objective == "params" else 0
    saved = 0.0
    for name in targets:
        layer = model.get_submodule(name)
        hw = infos[name].input_hw
        cost0 = layer_cost(layer, hw)[pick]
        kernel = (1, 1) if isinstance(layer, nn.Linear) else tuple(layer.kernel_size)
        # groups widen the join of a rank-1 branch, so the cheapest is ungrouped
        cheapest = min(layer_cost(layer, hw, [LowRankSpec(a, (1, 1), 1)])[pick] for a in kernel_splits(kernel))
        saved += max(0.0, cost0 - cheapest)
    return saved / total


def _cheapest(costs: dict[str, list[float]], total: float) -> float:
    """The model's cost with every layer at its cheapest candidate (index 0 is the original)."""
    return total - sum(c[0] - min(c) for c in costs.values())


def _check_budget(
    candidates: dict[str, LayerCandidates], config: CompressConfig, total: float, reach: Callable[[], float]
) -> dict[str, list[float]]:
    """Per-layer candidate costs; raises BudgetError when the reduction cannot be reached.

    Args:
        reach: the largest reduction at rank 1 in every target layer (called only on failure).
    """
    costs = {n: c.cost(config.objective) for n, c in candidates.items()}
    floor = _cheapest(costs, total)
    if config.reduction is not None and floor > (1 - config.reduction) * total:
        best = reach()
        what = "FLOPs" if config.objective == "flops" else config.objective
        if best < config.reduction:
            raise BudgetError(
                f"--reduction {config.reduction} cannot be met: even rank 1 in every target layer removes at most "
                f"{_down(best)} of the {what}; ask for at most that, or target more layers with --filter"
            )
        raise BudgetError(
            f"--reduction {config.reduction} cannot be met by the candidates kept: the smallest remove "
            f"{_down(1 - floor / total)} of the {what} (rank 1 everywhere would remove {_down(best)}); "
            "widen --grid (e.g. --grid 0.01:0.5), pass --families 0 or lower the reduction"
        )
    return costs


@torch.no_grad()
def _soft_labelled(model: nn.Module, subset, device) -> torch.utils.data.TensorDataset:
    """The search images with the original model's softmax as (probability) targets."""
    xs, ps = [], []
    for x, _ in batches(subset, 256):
        xs.append(x)
        ps.append(torch.softmax(model(x.to(device)), 1).cpu())
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ps))


def _search_data(data: DataBundle, config: CompressConfig, seed: int):
    """The labelled search subset and, apart from it, the proxy's images (None when the proxy is off)."""
    available = len(data.train)  # type: ignore[arg-type]
    if config.search_images > available:
        raise SpecError(f"--search-images {config.search_images} exceeds the {available} training images")
    subset, search_idx = search_subset(data.train, config.search_images, seed)
    n_proxy = min(config.proxy_images, available - config.search_images)
    if config.uses_proxy() and n_proxy < 1:
        raise SpecError(
            f"no training image is left for the proxy after {config.search_images} search images; "
            "lower --search-images or pass --families 0 --proxy-drop 0"
        )
    if config.uses_proxy() and n_proxy < config.proxy_images:
        log.warning("only %d training images are left for the proxy (asked %d): its verdicts are coarser; lower --search-images", n_proxy, config.proxy_images)
    proxy_set, _ = search_subset(data.train, n_proxy, seed + 1, exclude=search_idx) if config.uses_proxy() else (None, None)
    return subset, proxy_set


def _synthetic(model, shape, config: CompressConfig, seed: int, device, out, progress, seconds: dict[str, float]) -> SyntheticSplits:
    """The run's synthetic images (made, resumably in ``out``, or reused), split for learning, validation and fidelity."""
    t0 = time.perf_counter()
    synth = config.synth or SynthConfig()
    synthetic = obtain_synthetic(
        model, shape, synth, seed, device, Path(out) if out is not None else None, config.synthetic_path,
        (lambda d, t: progress("synthetic", d, t)) if progress is not None else None,
    )
    seconds["synthetic"] = time.perf_counter() - t0
    return split_synthetic(synthetic, config.synth_val, config.synth_test)


@torch.no_grad()
def _predictions(model: nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)])


def _synthetic_search_data(model, splits: SyntheticSplits, config: CompressConfig, device):
    """Data-free search images (the original model's soft labels) and proxy images, both synthetic."""
    n = len(splits.train)
    n_search = min(config.search_images, n)
    if config.uses_proxy() and n < config.search_images + config.proxy_images:
        # too few for both: share them in proportion rather than leave the proxy a handful of images
        n_proxy = min(n - 1, max(1, round(n * config.proxy_images / (config.search_images + config.proxy_images))))
        n_search = n - n_proxy
        log.warning(
            "%d synthetic training images: %d for the search and %d for the proxy (asked %d and %d; make more with --synth-images)",
            n, n_search, n_proxy, config.search_images, config.proxy_images,
        )
    subset = soft_labels(model, splits.train[:n_search], device)
    proxy = splits.train[n_search : n_search + config.proxy_images]
    if config.uses_proxy() and len(proxy) == 0:  # a single image: the proxy reuses it
        log.warning("every synthetic training image is a search image; the proxy reuses them (make more with --synth-images)")
        proxy = splits.train[: config.proxy_images]
    proxy_set = None
    if config.uses_proxy():  # labelled by the original's predictions: the accuracy proxy measures agreement
        proxy_set = torch.utils.data.TensorDataset(proxy, _predictions(model, proxy, device))
    return subset, proxy_set


def peak_memory_mib() -> dict[str, float]:
    """The process's peak resident memory so far (and the peak CUDA allocation, where CUDA is in use), in MiB."""
    import resource
    import sys

    try:  # Linux: the peak of this program (ru_maxrss would carry a parent's peak across fork and exec)
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    out = {"rss": rss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class _StageSeconds(dict):
    """Seconds per stage; recording a stage also notes the peak memory reached by its end."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_mib: dict[str, dict[str, float]] = {}
        self._high: dict[str, float] = {}

    def __setitem__(self, stage: str, value: float) -> None:
        super().__setitem__(stage, value)
        # a running maximum: the kernel's resident-size counters are batched per thread, so two
        # readings of the peak can differ by a few pages the wrong way
        for k, v in peak_memory_mib().items():
            self._high[k] = max(v, self._high.get(k, 0.0))
        self.peak_mib[stage] = dict(self._high)


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _proxy_errors(
    model: nn.Module, candidates: dict[str, LayerCandidates], proxy_set, kept: float, device, checkpoint: Path | None, progress,
) -> dict[str, dict[tuple, float]]:
    """Per layer, the output error of each family near the target (see ``search.proxy``).

    With a ``checkpoint`` file the errors are written there (atomically) when done and read back by
    a resumed run, which then skips the stage.
    """

    names = list(candidates)
    if checkpoint is not None and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        if saved.get("names") == names and saved.get("kept") == kept:
            log.info("output-error proxy: reusing %s", checkpoint)
            return {n: {_tuples(f): e for f, e in saved["errors"][n]} for n in names}
    inputs = capture_inputs(model, names, proxy_set, device)
    errors = {}
    for i, name in enumerate(names):
        errors[name] = output_errors(model.get_submodule(name), inputs.pop(name), candidates[name], kept)
        if progress is not None:
            progress("proxy", i + 1, len(names))
    if checkpoint is not None and ddp.is_main():
        atomic_write_json(checkpoint, {"names": names, "kept": kept, "errors": {n: [[f, e] for f, e in errs.items()] for n, errs in errors.items()}})
    return errors


def _accuracy_proxy(
    model: nn.Module, candidates: dict[str, LayerCandidates], proxy_set, config: CompressConfig, total: float, device,
    checkpoint: Path | None, progress,
) -> tuple[dict[str, LayerCandidates], dict[str, Any]]:
    """Removes the candidates whose layer, compressed alone, loses more than ``config.proxy_drop``
    points of top-1 on the proxy images (see ``search.accuracy_proxy``).

    While what is left cannot meet the budget, the threshold doubles. With a ``checkpoint`` the
    measured drops are saved after every layer and a resumed run measures only what is missing.
    Layers left with no candidate keep their original form.
    """

    names = list(candidates)
    measured: dict[str, ProxyResult] = {}
    if checkpoint is not None and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        if saved.get("candidates") == {n: len(c) for n, c in candidates.items()}:
            log.info("accuracy proxy: reusing the drops measured in %s", checkpoint)
            measured = {
                n: ProxyResult(n, r["original_top1"], {int(i): d for i, d in r["drops"].items()}, set(r.get("bounds", [])))
                for n, r in saved["layers"].items()
            }
    # one recording of the proxy images shared by every layer (what the candidates replay)
    recording = PrefixRecording(model, proxy_set, device, names)
    threshold = config.proxy_drop
    while True:
        for k, name in enumerate(names):
            result = measure_drops(model, candidates[name], None, device, threshold, known=measured.get(name), recording=recording)
            if name not in measured or (result.drops, result.bounds) != (measured[name].drops, measured[name].bounds):
                measured[name] = result
                if checkpoint is not None and ddp.is_main():
                    atomic_write_json(checkpoint, {
                        "candidates": {n: len(c) for n, c in candidates.items()},
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
        floor = _cheapest({n: c.cost(config.objective) for n, c in kept.items()}, total)
        if config.reduction is None or floor <= (1 - config.reduction) * total or threshold >= 100:
            break
        log.warning(
            "accuracy proxy: the candidates within %.3g points of top-1 cannot remove %.3g of the cost; trying %.3g points",
            threshold, config.reduction, 2 * threshold,
        )
        threshold = min(100.0, 2 * threshold)
    before = sum(len(c) - 1 for c in candidates.values())
    after = {n: c for n, c in kept.items() if c.specs}
    summary = {
        "threshold_pp": config.proxy_drop, "threshold_used_pp": threshold, "images": len(proxy_set),
        "evaluated": sum(len(r.drops) for r in measured.values()), "stopped_early": sum(len(r.bounds) for r in measured.values()),
        "shared_recording": bool(recording.kept), "candidates_before": before,
        "candidates_after": sum(len(c) - 1 for c in after.values()),
        "layers_left_original": [n for n in names if n not in after],
    }
    if not after:
        raise SpecError(f"every candidate loses more than {threshold:g} points of top-1 on its own; raise --proxy-drop or pass --proxy-drop 0")
    log.info("accuracy proxy: %d of %d candidates within %.3g points (%d measured)", summary["candidates_after"], before, threshold, summary["evaluated"])
    return after, summary


def _search_once(
    model: nn.Module,
    candidates: dict[str, LayerCandidates],
    costs: dict[str, list[float]],
    fixed: float,
    total: float,
    config: CompressConfig,
    sconf: SearchConfig,
    subset,
    device,
    seed: int,
    progress,
    seconds: dict[str, float],
    prefix: str,
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, list[LowRankSpec]], SearchHistory]:
    """Build the super model over ``candidates``, learn its logits, pick one candidate per layer."""
    t0 = time.perf_counter()
    supernet, mixed = build_supernet(model, candidates, sconf.sampling, window_dtype(sconf.window_dtype, device))
    supernet.to(device)
    seconds[prefix + "build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    steps = -(-len(subset) // sconf.batch_size)

    def on_step(step: int, epoch: int) -> None:
        if progress is not None:
            progress(prefix + "search", epoch * steps + step + 1, sconf.epochs * steps)

    # the search's cost terms see the layers outside this search at their current cost
    ckpt = Path(checkpoint_dir) / f"checkpoint-{prefix or 'b1_'}search.pt" if checkpoint_dir is not None else None
    history = search(supernet, mixed, subset, sconf, costs, total, device, seed, on_step, fixed=fixed, checkpoint=ckpt)
    seconds[prefix + "search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = list(mixed)
    scores = [mixed[n].theta.detach().cpu().tolist() for n in names]
    cost_lists = [costs[n] for n in names]
    if config.reduction is not None:
        budget = (1 - config.reduction) * total
        choice = select_within_budget(scores, cost_lists, budget, fixed, [candidates[n].next_rank() for n in names])
    else:
        choice = [max(range(len(s)), key=s.__getitem__) for s in scores]
    chosen = {n: (candidates[n].base if c == 0 else [*candidates[n].prefix, candidates[n].specs[c - 1]]) for n, c in zip(names, choice)}
    history.logits = dict(zip(names, scores))
    history.choice = dict(zip(names, choice))
    seconds[prefix + "select"] = time.perf_counter() - t0
    return chosen, history


def _second_branch_candidates(
    model: nn.Module, infos, plan: Plan, costs: dict[str, list[float]], total: float, config: CompressConfig
) -> tuple[dict[str, LayerCandidates], float]:
    """Candidates of the second search: each compressed layer's first branch loses the ranks worth
    20% of the original layer's cost (at least one), and second branches over its residual fill
    between 5% and min(1 - first branch's share, 40%) of the original cost. Returns them and the
    cost of everything outside the second search."""
    cands2: dict[str, LayerCandidates] = {}
    outside = total - sum(c[0] for c in costs.values())
    for name, specs in plan.layers.items():
        layer = model.get_submodule(name)
        hw = infos[name].input_hw
        pick = (lambda mp: mp[1]) if config.objective == "params" else (lambda mp: mp[0])
        cost0 = pick(layer_cost(layer, hw))
        if not specs:
            outside += cost0 if name in costs else 0.0
            continue
        b1 = specs[0]
        unit = pick(layer_cost(layer, hw, [b1.with_rank(2)])) - pick(layer_cost(layer, hw, [b1.with_rank(1)])) if b1.rank > 1 else pick(layer_cost(layer, hw, [b1]))
        withdraw = max(1, math.ceil(0.2 * cost0 / max(unit, 1)))
        relaxed = b1.with_rank(max(1, b1.rank - withdraw))
        share = pick(layer_cost(layer, hw, [relaxed])) / cost0
        top = min(1 - share, 0.40)
        if top < 0.05:
            outside += pick(layer_cost(layer, hw, [b1]))
            continue
        fractions = fraction_grid(0.05, math.floor(top / 0.05 + 1e-9) * 0.05)
        cands = _limit_groups(grid_candidates(name, layer, hw, fractions, config.objective, prefix=[relaxed]), config.max_groups)
        if cands.specs:
            # index 0 is the first branch as the first search left it, not the original layer
            cands.base = [b1]
            cands.macs[0], cands.params[0] = layer_cost(layer, hw, [b1])
            cands2[name] = cands
        else:
            outside += pick(layer_cost(layer, hw, [b1]))
    return cands2, outside


def compress(
    model: nn.Module,
    data: DataBundle | None,
    config: CompressConfig,
    input_shape: tuple[int, int, int] | None = None,
    filter_fn: FilterFn | str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    model_spec: str = "python:model",
    progress: Callable[[str, int, int], None] | None = None,
    resume: bool = False,
    reference: dict[str, float] | None = None,
) -> CompressResult:
    """Compress ``model`` by SVD-NAS; the original is not modified.

    Args:
        model: a pre-trained model.
        data: labelled data; search images come from its training split, accuracy from its test split.
            None only in ``data-free`` mode (accuracies are then None; ``fidelity`` is reported).
        config: budget, objective and search settings.
        input_shape: (C, H, W) of one input; defaults to the data's.
        filter_fn: which layers to compress (a preset name or a function); defaults to the config's,
            then ``all-but-first``.
        out: run directory to write, if any.
        model_spec: how ``model`` can be rebuilt (written into architecture.json).
        progress: called with (stage, done, total).
        reference: the original model's top-1/top-5 on the test split, if already measured.
        resume: checkpoint every search epoch in ``out`` and pick up from a checkpoint left
            there by a run that was killed (the result equals an uninterrupted run's).
    """
    t_start = time.perf_counter()
    seconds = _StageSeconds()
    if data is None and config.mode != "data-free":
        raise DataError(f"--mode {config.mode} needs real data: --data none works only with --mode data-free")
    if input_shape is None and data is None:
        raise SpecError("without data, give the input shape (--input-shape C,H,W)")
    shape = tuple(input_shape or data.input_shape)  # type: ignore[union-attr]
    model = model.to(device).eval()
    torch.manual_seed(seed)

    # 1. targets and their candidates
    t0 = time.perf_counter()
    check_finite(model.state_dict(), "the model")
    infos = trace_layers(model, example_input(model, shape))
    targets, skipped = require_targets(model, infos, filter_fn or config.filter or "all-but-first")
    total_macs, total_params = model_macs(model, shape), count_params(model)
    total = float(total_macs if config.objective == "flops" else total_params)
    fractions = config.fractions()
    candidates = {}
    for name in targets:
        layer = model.get_submodule(name)
        cands = _limit_groups(grid_candidates(name, layer, infos[name].input_hw, fractions, config.objective), config.max_groups)
        if cands.specs:
            candidates[name] = cands
    if not candidates:
        raise SpecError("no target layer has a candidate on the grid; widen --grid")

    def reach() -> float:
        return _rank_one_reach(model, infos, targets, config, total)

    if config.objective != "latency":  # latencies are measured once the proxy has pruned the candidates
        _check_budget(candidates, config, total, reach)
    seconds["candidates"] = time.perf_counter() - t0

    # 2. pruning by the output-error proxy on images kept apart from the search images
    splits: SyntheticSplits | None = None
    if config.mode in ("synthetic", "data-free") and config.synthetic_path is None:
        require_batchnorm(model, model_spec)  # fail before the search, not after it
    if config.mode == "data-free":
        splits = _synthetic(model, shape, config, seed, device, out, progress, seconds)
        subset, proxy_set = _synthetic_search_data(model, splits, config, device)
    else:
        subset, proxy_set = _search_data(data, config, seed)
    t0 = time.perf_counter()
    kept = 1 - config.reduction if config.reduction is not None else sum(fractions) / len(fractions)
    if config.families > 0:
        proxy_ckpt = Path(out) / "checkpoint-proxy.json" if out is not None and resume else None
        all_errors = _proxy_errors(model, candidates, proxy_set, kept, device, proxy_ckpt, progress)
        for name in list(candidates):
            candidates[name] = keep_families(candidates[name], all_errors[name], config.families)
    seconds["proxy"] = time.perf_counter() - t0
    latency_costs = None
    if config.objective == "latency":

        t0 = time.perf_counter()
        latency_costs = attach_latency(model, shape, candidates, LatencyTable(device, config.latency))
        total = latency_costs.total
        seconds["latency_table"] = time.perf_counter() - t0

        def reach() -> float:  # measured latencies of the candidates left: the cheapest of each layer
            return 1 - _cheapest({n: c.cost("latency") for n, c in candidates.items()}, total) / total

        _check_budget(candidates, config, total, reach)  # before the accuracy proxy spends its time

    accuracy_proxy: dict[str, Any] | None = None
    if config.proxy_drop > 0:
        t0 = time.perf_counter()
        ckpt = Path(out) / "checkpoint-accuracy.json" if out is not None and resume else None
        candidates, accuracy_proxy = _accuracy_proxy(model, candidates, proxy_set, config, total, device, ckpt, progress)
        accuracy_proxy["seconds"] = seconds["accuracy_proxy"] = time.perf_counter() - t0
    costs = _check_budget(candidates, config, total, reach)
    fixed = total - sum(c[0] for c in costs.values())
    log.info("%d target layers, %d candidates (grid %s..%s)", len(candidates), sum(len(c) - 1 for c in candidates.values()), fractions[0], fractions[-1])

    if config.search_loss == "kd" and config.mode != "data-free":
        subset = _soft_labelled(model, subset, device)

    # 3-5. super model, search, selection within the budget
    sconf = copy.deepcopy(config.search) or SearchConfig(target=0.5)
    sconf.target = None if config.beta is not None else 1 - config.reduction  # type: ignore[operator]
    sconf.beta = config.beta
    sconf.__post_init__()
    ckpt_dir = Path(out) if out is not None and resume else None
    chosen, history = _search_once(model, candidates, costs, fixed, total, config, sconf, subset, device, seed, progress, seconds, "", ckpt_dir)
    plan = Plan({n: chosen.get(n, []) for n in targets})
    stages = [candidates]
    branch_reports: dict[str, Any] = {}
    if config.branches == 2:
        t0 = time.perf_counter()
        if ddp.is_main():
            compressed_b1 = apply_plan(copy.deepcopy(model), plan)
            b1 = build_report(model, compressed_b1, plan, infos, shape, data, device, {}, latency=False, reference=reference)
            branch_reports["b1"] = {k: b1[k] for k in ("flops", "params", "top1", "top5")} | {"plan": plan.to_dict()}
        cands2, fixed2 = _second_branch_candidates(model, infos, plan, costs, total, config)
        if latency_costs is not None and cands2:

            fixed2 = attach_second_branch(model, cands2, candidates, plan.layers, latency_costs, LatencyTable(device, config.latency))
            stages.append(cands2)
        seconds["b1_evaluate"] = time.perf_counter() - t0
        if cands2:
            sconf2 = copy.deepcopy(sconf)
            sconf2.epochs = max(1, sconf.epochs // 2)  # the paper: 50 epochs for the second branch, 100 for the first
            costs2 = {n: c.cost(config.objective) for n, c in cands2.items()}
            chosen2, history2 = _search_once(model, cands2, costs2, fixed2, total, config, sconf2, subset, device, seed + 1, progress, seconds, "b2_", ckpt_dir)
            for n, specs in chosen2.items():
                plan.layers[n] = specs
            history = {"b1": history, "b2": history2}
    compressed = apply_plan(copy.deepcopy(model), plan)
    hist = {k: v.to_dict() for k, v in history.items()} if isinstance(history, dict) else history.to_dict()

    # 6. recovery by distillation
    recovery: dict[str, Any] | None = None
    seconds["finetune"] = 0.0
    if config.mode != "post-training":
        before = evaluate(compressed, data.test, device) if data is not None and ddp.is_main() else None
        if config.mode == "synthetic":
            splits = _synthetic(model, shape, config, seed, device, out, progress, seconds)
        ckpt = Path(out) / "checkpoint-finetune.pt" if out is not None and resume else None
        fconf = config.finetune or FinetuneConfig(mode="synthetic" if config.mode == "data-free" else config.mode)
        recovery = recover(
            model, compressed, plan, config.mode, fconf, data, splits, device, seed, ckpt,
            (lambda d, t: progress("finetune", d, t)) if progress is not None else None,
        )
        seconds["finetune"] = recovery["seconds"]
        if before is not None:
            recovery["before"] = before
    if not ddp.is_main():  # under torchrun, rank 0 evaluates and writes
        return CompressResult(compressed, plan, {}, hist)

    # 7. evaluation and report
    t0 = time.perf_counter()
    header = {
        "model": model_spec, "method": "svdnas", "mode": config.mode, "objective": config.objective, "seed": seed,
        "reduction_target": config.reduction, "beta": config.beta, "sampling": sconf.sampling,
        "search_dtype": str(window_dtype(sconf.window_dtype, device)).removeprefix("torch.") if sconf.sampling == "mixed" else None,
        "search_loss": "kd" if config.mode == "data-free" else config.search_loss,
    }
    timing = {"latency_batch": latency_costs.table["batch"], "latency_threads": latency_costs.table["threads"]} if latency_costs else {}
    report = build_report(model, compressed, plan, infos, shape, data, device, header, reference=reference, progress=progress, **timing)
    if latency_costs is not None:

        report["latency"]["predicted"] = predicted_report(stages, plan.layers, latency_costs)
    if recovery is not None:
        if data is not None:
            recovery["after"] = {"top1": report["top1"]["compressed"], "top5": report["top5"]["compressed"]}
        report["recovery"] = recovery
    if splits is not None:
        report["fidelity"] = fidelity(compressed, model, splits.test, device)
        report["synthetic"] = synthetic_summary(splits.meta) | {"images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}}
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    for entry in report["layers"]:
        entry["candidates"] = len(candidates[entry["name"]]) - 1 if entry["name"] in candidates else 0
    report["seconds"] = dict(seconds)
    # cumulative: the process's peak so far at the end of each stage (the search's own cost is
    # where the value grows); measured, not estimated
    report["peak_memory_mib"] = seconds.peak_mib
    synthetic_search = config.mode == "data-free"
    report["data"] = {
        "spec": data.name if data is not None else "none", "search_images": len(subset),
        "search_split": "synthetic images with the original model's soft labels" if synthetic_search else "train (fixed subset drawn with --seed)",
        "proxy_images": len(proxy_set) if proxy_set is not None else 0,
        "proxy_split": "synthetic images, apart from the search images" if synthetic_search else "train, apart from the search images",
        "processes": ddp.world_size(),
        "evaluation_images": len(data.test) if data is not None else 0, "evaluation_split": "test" if data is not None else None,
    }
    if accuracy_proxy is not None:
        report["accuracy_proxy"] = accuracy_proxy
    report["search"] = {"config": asdict(sconf), "grid": fractions, "candidates": sum(len(c) - 1 for c in candidates.values()), "branches": config.branches}
    report["skipped"] = [{"name": n, "reason": r} for n, r in skipped.items()]
    if branch_reports:
        branch_reports["b2"] = {k: report[k] for k in ("flops", "params", "top1", "top5")}
        report["branches"] = branch_reports
    result = CompressResult(compressed, plan, report, hist)
    if out is not None:
        write_run(out, compressed, plan, model_spec, shape, report, history=hist)
        for ckpt in [*Path(out).glob("checkpoint-*.pt"), *Path(out).glob("checkpoint-*.json")]:
            ckpt.unlink()
    return result
