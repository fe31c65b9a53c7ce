"""The named stages of a compress job, shared by ``compress``, ``run_baseline`` and ``finetune``.

Each stage takes the :class:`Job` (the original model, its data and where the run goes) and what the
stages before it produced, records its seconds and peak memory in ``job.seconds``, and returns what
the next stage needs. In order, for ``compress``:

1. :func:`prepare`: copy the model, check its weights, trace the layers' shapes, choose the targets.
2. :func:`make_candidates`: the FLOPs grid of each target layer's LR-space, checked against the budget.
3. :func:`search_images`: the labelled (or synthetic) search images and, apart from them, the proxy's.
4. :func:`calibrate`: for the output-aware derivations, each target layer's input moments.
5. :func:`prune`: families by output error; candidates timed in the latency table (the latency
   objective's costs, and under every objective only candidates faster than their layer offered);
   candidates by the one-layer accuracy proxy; what is left is checked against the budget again.
6. :func:`search_plan`: a super model, its logits learned, one candidate per layer within the budget;
   with two branches, a second search over the first branch's residual. :func:`check_plan`: the
   plan beside the spectrum allocations', the one nearest the original kept. :func:`meet_latency_budget`
   (latency objective): the plan selected again until the whole model, measured, meets the budget.
7. :func:`derive_model`: the plan's factors (``prefix``: fitted layer by layer on the compressed
   prefix), then :func:`recover`: distillation, in the modes that fine-tune.
8. :func:`report`, then :func:`write`: accuracy, costs and latency measured; the run directory written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas import distributed as ddp
from svdnas.cost.counting import count_params, model_macs
from svdnas.cost.table import LatencyTable
from svdnas.cost.timer import channel_block, compare_latency, default_runtime
from svdnas.data.datasets import DataBundle
from svdnas.data.evaluate import batches, evaluate
from svdnas.errors import BudgetError, DataError, SpecError, WriteError
from svdnas.lowrank.calibration import PATCHES_PER_COLUMN, sampling
from svdnas.lowrank.derivation import Derivation, statistics_bytes
from svdnas.lowrank.derivation import calibrate as calibrate_layers
from svdnas.lowrank.geometry import layer_geometry
from svdnas.lowrank.plan import Plan
from svdnas.models.weights import check_finite
from svdnas.pipeline.config import CompressConfig
from svdnas.pipeline.images import real_search_images, soft_labelled, synthetic_search_images, synthetic_splits
from svdnas.pipeline.timing import StageSeconds
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import SyntheticSplits, fidelity, synthetic_summary
from svdnas.recovery.recover import recover as distil
from svdnas.recovery.synthetic import require_batchnorm
from svdnas.report.build import build_report
from svdnas.runs.directory import PYTHON_BASE, RunDir, write_run
from svdnas.search import SearchConfig, allocation, fraction_grid, grid_candidates, window_dtype
from svdnas.search.branch import search_branch
from svdnas.search.budget import cheapest_total, check_budget, rank_one_reach
from svdnas.search.candidates import LayerCandidates, limit_groups
from svdnas.search.latency_costs import (
    NS_PER_MS,
    LatencyCosts,
    attach_latency,
    attach_second_branch,
    drop_slower,
    offer_only_faster,
    predicted_report,
)
from svdnas.search.measured_budget import meet_measured_budget
from svdnas.search.output_proxy import keep_families
from svdnas.search.pruning import accuracy_prune, proxy_errors
from svdnas.search.residual import second_branch_candidates
from svdnas.search.select import select_within_budget
from svdnas.surgery.prefix import fit_on_prefix
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import FilterFn, require_targets
from svdnas.surgery.trace import LayerInfo, example_input, trace_layers

log = logging.getLogger(__name__)

# history.json's plan_from for each plan the plan check can keep
PLAN_FROM = {"search": "search", "spectrum": "spectrum allocation", "weighted": "weighted spectrum allocation"}
Progress = Callable[[str, int, int], None]


@dataclass
class Job:
    """What every stage of a run reads: the original model and its traced layers, data and destination.

    Attributes:
        model: the job's own copy of the original model, on ``device`` in eval mode (the caller's is untouched).
        shape: (C, H, W) of one input.
        infos: every Conv/Linear layer met in one forward pass, by dotted name.
        targets: the layers to compress, in forward order; ``skipped``: layers left alone, with why.
        macs, params: the original model's whole counts.
        run: where the run directory goes (None: nothing is written).
        resume: checkpoint each stage in ``run`` and pick up from what a killed run left there.
        seconds: seconds (and peak memory) per stage, as the report gives them.
    """

    model: nn.Module
    data: DataBundle | None
    shape: tuple[int, ...]
    device: torch.device
    seed: int
    infos: dict[str, LayerInfo]
    targets: list[str]
    skipped: dict[str, str]
    macs: int
    params: int
    run: RunDir | None = None
    resume: bool = False
    progress: Progress | None = None
    reference: dict[str, float] | None = None
    seconds: StageSeconds = field(default_factory=StageSeconds)
    started: float = field(default_factory=time.perf_counter)
    calibration: dict[str, Any] | None = None
    closeness: dict[int, allocation.Closeness] = field(default_factory=dict)

    def closeness_on(self, images: torch.utils.data.Dataset) -> allocation.Closeness:
        """Mean KL scores of compressed models on ``images``, kept for the whole job (one per image set)."""
        found = self.closeness.get(id(images))  # a Closeness holds its images, so their id is not reused
        if found is None:
            found = self.closeness[id(images)] = allocation.Closeness(self.model, images, self.device)
        return found

    @property
    def checkpoints(self) -> Path | None:
        """The folder that stage checkpoints go to, when the job resumes."""
        return self.run.path if self.run is not None and self.resume else None

    def total(self, objective: str) -> float:
        """The original's whole cost on ``objective`` (latency is measured later, by :func:`prune`)."""
        return float(self.macs if objective in ("flops", "latency") else self.params)

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def ticker(self, stage: str) -> Callable[[int, int], None] | None:
        return (lambda d, t: self.tick(stage, d, t)) if self.progress is not None else None


def prepare(
    model: nn.Module,
    data: DataBundle | None,
    input_shape: tuple[int, ...] | None,
    filter_fn: FilterFn | str,
    device: torch.device | str,
    seed: int,
    out: str | Path | RunDir | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    reference: dict[str, float] | None = None,
) -> Job:
    """The job's copy of the model, checked and traced, with its target layers.

    Raises:
        SpecError: no input shape, a model that fails on it, or no layer to compress.
        WeightsError: non-finite weights.
    """
    started = time.perf_counter()
    if input_shape is None and data is None:
        raise SpecError("without data, give the input shape (--input-shape C,H,W)")
    shape = tuple(input_shape or data.input_shape)  # type: ignore[union-attr]
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    if device.type == "cpu":  # convolutions run 1.1-1.5x faster in channels-last memory on a CPU (measured)
        model = model.to(memory_format=torch.channels_last)
    check_finite(model.state_dict(), "the model")
    infos = trace_layers(model, example_input(model, shape))
    targets, skipped = require_targets(model, infos, filter_fn)
    run = RunDir.of(out) if out is not None else None
    if run is not None and ddp.is_main():
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(run.path, e) from e
    return Job(
        model, data, shape, device, seed, infos, targets, skipped, model_macs(model, shape), count_params(model),
        run, resume, progress, reference, started=started,
    )


def rank_multiple(job: Job, config: CompressConfig) -> int:
    """``--rank-multiple``, or the channel block of the runtime's kernels on the job's device."""
    return config.rank_multiple if config.rank_multiple is not None else channel_block(job.device)


def layer_rank_multiple(job: Job, config: CompressConfig, name: str) -> int:
    """The rank multiple of one layer: ``--rank-multiple`` as given; by default the device's channel
    block where the layer's own channels are whole blocks (elsewhere its convolutions leave the
    blocked layout anyway, and rounding would only coarsen the grid), else 1."""
    if config.rank_multiple is not None:
        return config.rank_multiple
    layer = job.model.get_submodule(name)
    if isinstance(layer, nn.Linear):  # a matrix product: no blocked layout to keep
        return 1
    block = channel_block(job.device)
    geo = layer_geometry(layer)
    return block if geo.in_channels % block == 0 and geo.out_channels % block == 0 else 1


def latency_table(job: Job, config: CompressConfig) -> LatencyTable:
    """The latency objective's table, timed in the runtime the budget is met in: ONNX Runtime's
    (the default when installed) on a CPU, else PyTorch's."""
    runtime = config.runtime or default_runtime()
    engine = "onnxruntime" if runtime == "onnxruntime" and job.device.type == "cpu" else "pytorch"
    return LatencyTable(job.device, config.latency, engine=engine)


def layer_grid(job: Job, config: CompressConfig, name: str, fractions: Sequence[float]) -> LayerCandidates:
    """One target layer's candidates at the kept-cost ``fractions``, ranks in the layer's multiple
    (by default, where no candidate keeps whole blocks, any rank: the default never leaves a layer out)."""
    layer = job.model.get_submodule(name)

    def grid(multiple: int) -> LayerCandidates:
        return limit_groups(grid_candidates(name, layer, job.infos[name].input_hw, fractions, config.objective, rank_multiple=multiple),
                            config.max_groups)

    multiple = layer_rank_multiple(job, config, name)
    cands = grid(multiple)
    if not cands.specs and multiple > 1:
        if config.rank_multiple is None:
            cands = grid(1)
        else:
            log.warning("%s: no candidate on the grid keeps whole blocks of %d channels; the layer is left as it is", name, multiple)
    return cands


def make_candidates(job: Job, config: CompressConfig) -> dict[str, LayerCandidates]:
    """Each target layer's candidates on the FLOPs grid, checked against the budget (latency: later)."""
    t0 = time.perf_counter()
    fractions = config.fractions()
    candidates = {}
    for name in job.targets:
        cands = layer_grid(job, config, name, fractions)
        if cands.specs:
            candidates[name] = cands
    if not candidates:
        raise SpecError("no target layer has a candidate on the grid; widen --grid")
    if config.objective != "latency":  # latencies are measured once the proxy has pruned the candidates
        total = job.total(config.objective)
        check_budget(candidates, config.objective, config.reduction, total, lambda: rank_one_reach(job.model, job.infos, job.targets, config.objective, total))
    job.seconds["candidates"] = time.perf_counter() - t0
    return candidates


@dataclass
class SearchImages:
    """The search's images (labels or soft labels), the proxy's (None when both proxies are off), and
    the synthetic images a data-free run made (None otherwise)."""

    search: torch.utils.data.Dataset
    proxy: torch.utils.data.Dataset | None
    synthetic: SyntheticSplits | None = None


def search_images(job: Job, config: CompressConfig) -> SearchImages:
    """Real training images apart for search and proxy, or (data-free) synthetic ones."""
    if config.mode in ("synthetic", "data-free") and config.synthetic_path is None:
        require_batchnorm(job.model, job.run.base if job.run is not None else "the model")  # fail before the search, not after it
    if config.mode == "data-free":
        splits = synthetic_splits(job.model, job.shape, config, job.seed, job.device, _run_path(job), job.progress, job.seconds)
        return SearchImages(*synthetic_search_images(job.model, splits, config, job.device), splits)
    return SearchImages(*real_search_images(job.data, config, job.seed))


@dataclass
class Pruned:
    """The candidates the search runs over and their costs on the objective.

    Attributes:
        costs: per layer, each candidate's cost (the original first); ``fixed``: the cost of
            everything outside the target layers; ``total``: the original's whole cost.
        latency: the measured latency table's costs (latency objective only).
        timed: what the latency table did to keep only candidates faster than their layer, with
            ``slower_dropped`` (None with ``--offer-slower``).
        accuracy_proxy: the accuracy proxy's summary for the report (None when it is off).
    """

    candidates: dict[str, LayerCandidates]
    costs: dict[str, list[float]]
    fixed: float
    total: float
    latency: LatencyCosts | None = None
    timed: dict[str, Any] | None = None
    accuracy_proxy: dict[str, Any] | None = None
    derivation: Derivation = field(default_factory=Derivation)


def calibration_set(images: torch.utils.data.Dataset, count: int) -> torch.utils.data.Dataset:
    """The first ``count`` of ``images``: the calibration images of the output-aware derivations."""
    return torch.utils.data.Subset(images, range(min(count, len(images))))


def calibrate(job: Job, kind: str, layer_specs: dict[str, Any], calibration: torch.utils.data.Dataset,
              patches_per_column: int = PATCHES_PER_COLUMN) -> Derivation:
    """The job's derivation: for the output-aware kinds, each named layer's input moments on the
    ``calibration`` images, for every family among its specs, each summing at least
    ``patches_per_column`` patches per column where the images give more (0: every patch)."""
    t0 = time.perf_counter()
    derivation = calibrate_layers(job.model, kind, layer_specs, (x for x, _ in batches(calibration, 128)), job.device,
                                  sampling=sampling(len(calibration), patches_per_column))
    if not derivation.plain:
        seconds = time.perf_counter() - t0
        job.seconds["calibration"] = job.seconds.get("calibration", 0.0) + seconds  # a baseline may calibrate once per split
        job.calibration = {"images": len(calibration), "patches_per_column": patches_per_column or None,
                           "bytes": statistics_bytes(derivation), "seconds": seconds}
    return derivation


def derive_model(job: Job, plan: Plan, derivation: Derivation, calibration: torch.utils.data.Dataset | None,
                 held_out: torch.utils.data.Dataset | None = None) -> nn.Module:
    """The compressed model: the plan's factors as the derivation derives them, or (``prefix``) each
    layer fitted in forward order on the inputs the compressed layers before it give it, biases
    corrected. With ``held_out`` images (apart from the calibration images) each layer keeps the
    fitted factors or the derivation's, whichever errs less on them, and then the whole model is
    kept or replaced by the derivation's own (the search's whitened factors), whichever is nearer the
    original there by mean KL. The per-layer output errors before and after, and what each check
    kept, go to the report's ``calibration``."""
    derived = lambda: _standard_memory(apply_plan(copy.deepcopy(job.model), plan, derivation=derivation))
    if not derivation.fits_prefix:
        return derived()
    if calibration is None:
        raise SpecError("the prefix derivation needs calibration images")
    t0 = time.perf_counter()
    images = [x for x, _ in batches(calibration, 128)]
    spare = [x for x, _ in batches(held_out, 128)] if held_out is not None else []
    fit = fit_on_prefix(job.model, plan, job.targets, images, job.device, derivation, held_out=spare,
                        refit_iters=derivation.prefix_refit_iters, damping=derivation.damping,
                        patches_per_column=derivation.sampling.per_column if derivation.sampling else None, progress=job.ticker("prefix_fit"))
    model = _standard_memory(fit.model)
    block = {"images": fit.images, "held_out_images": fit.held_out, "relative_output_error": fit.errors}
    if fit.held_out:
        block["kept_derived"] = sorted(n for n, e in fit.errors.items() if e["kept"] == "derived")
        closeness = job.closeness_on(held_out)  # the plan check scored the search's plan on these images already
        kl_derived, own = closeness.scored(plan, derivation)
        kl = {"fitted": closeness.of_model(model), "derived": kl_derived}
        kept = "derived" if kl["derived"] < kl["fitted"] else "fitted"
        block["model_check"] = {"mean_kl": kl, "kept": kept}
        if kept == "derived":
            log.info("prefix fit: the search's own factors are nearer the original on the %d held-out images (mean KL %.3g "
                     "against %.3g); kept them", fit.held_out, kl["derived"], kl["fitted"])
            model = (_standard_memory(own) if own is not None else derived()).eval()
    block["seconds"] = time.perf_counter() - t0
    job.seconds["prefix_fit"] = job.seconds.get("prefix_fit", 0.0) + block["seconds"]  # a baseline may fit once per split
    job.calibration = (job.calibration or {}) | {"prefix_fit": block}
    return model


def _standard_memory(model: nn.Module) -> nn.Module:
    """``model`` with its weights in the default (contiguous) memory format, as a caller expects it
    (the job's copy of the original runs channels-last on a CPU)."""
    return model.to(memory_format=torch.contiguous_format)


def prune(job: Job, config: CompressConfig, candidates: dict[str, LayerCandidates], proxy_set, derivation: Derivation | None = None) -> Pruned:
    """Families kept by output error; candidates timed (the latency objective's costs; only those faster than their
    layer kept, unless ``--offer-slower``); candidates kept by the accuracy proxy."""
    model, total = job.model, job.total(config.objective)
    derivation = derivation or Derivation()

    def reach() -> float:
        return rank_one_reach(model, job.infos, job.targets, config.objective, total)

    t0 = time.perf_counter()
    kept = 1 - config.reduction if config.reduction is not None else sum(config.fractions()) / len(config.fractions())
    if config.families > 0:
        ckpt = job.checkpoints / "checkpoint-proxy.json" if job.checkpoints is not None else None
        errors = proxy_errors(model, candidates, proxy_set, kept, job.device, ckpt, job.progress, derivation, config.objective)
        for name in list(candidates):
            candidates[name] = keep_families(candidates[name], errors[name], config.families)
    job.seconds["proxy"] = time.perf_counter() - t0
    latency_costs = timed = None
    if config.objective == "latency":
        t0 = time.perf_counter()
        latency_costs = attach_latency(model, job.shape, candidates, latency_table(job, config))
        if not config.offer_slower:
            timed = latency_costs.table
            timed["slower_dropped"] = drop_slower(candidates)
        total = latency_costs.total
        job.seconds["latency_table"] = time.perf_counter() - t0

        def reach() -> float:  # measured latencies of the candidates left: the cheapest of each layer
            return 1 - cheapest_total({n: c.cost("latency") for n, c in candidates.items()}, total) / total

        check_budget(candidates, config.objective, config.reduction, total, reach)  # before the accuracy proxy spends its time
    elif not config.offer_slower:
        t0 = time.perf_counter()
        every = dict(candidates)
        timed = offer_only_faster(model, candidates, latency_table(job, config))
        job.seconds["latency_table"] = time.perf_counter() - t0
        if timed is not None and timed["slower_dropped"]:
            try:
                check_budget(candidates, config.objective, config.reduction, total, reach)
            except BudgetError:  # the budget comes first: a FLOPs budget is met, at some latency
                log.warning("the budget cannot be met with only the candidates faster than their layer; the %d measured slower "
                            "are offered too, so the plan may run slower than the original (the report says)", timed["slower_dropped"])
                candidates.clear()
                candidates.update(every)
                timed["slower_offered_for_the_budget"] = timed["slower_dropped"]
                timed["slower_dropped"] = 0
    summary = None
    if config.proxy_drop > 0:
        t0 = time.perf_counter()
        ckpt = job.checkpoints / "checkpoint-accuracy.json" if job.checkpoints is not None else None
        candidates, summary = accuracy_prune(
            model, candidates, proxy_set, config.proxy_drop, config.objective, config.reduction, total, job.device, ckpt, job.progress,
            derivation,
        )
        summary["seconds"] = job.seconds["accuracy_proxy"] = time.perf_counter() - t0
    costs = check_budget(candidates, config.objective, config.reduction, total, reach)
    fixed = total - sum(c[0] for c in costs.values())
    fractions = config.fractions()
    log.info("%d target layers, %d candidates (grid %s..%s)", len(candidates), sum(len(c) - 1 for c in candidates.values()), fractions[0], fractions[-1])
    return Pruned(candidates, costs, fixed, total, latency_costs, timed, summary, derivation)


def search_config(config: CompressConfig) -> SearchConfig:
    """The search loop's settings with the budget filled in from the job's."""
    sconf = copy.deepcopy(config.search) or SearchConfig(target=0.5)
    sconf.target = None if config.beta is not None else 1 - config.reduction  # type: ignore[operator]
    sconf.beta = config.beta
    sconf.__post_init__()
    return sconf


@dataclass
class Searched:
    """The plan, the search's history (per branch with two), the candidate sets the latency
    prediction needs, the first branch's own figures when there are two, and what the measured
    latency budget and the plan check did (None where they did not run)."""

    plan: Plan
    history: dict[str, Any]
    stages: list[dict[str, LayerCandidates]]
    branch_reports: dict[str, Any]
    config: SearchConfig
    measured_budget: dict[str, Any] | None = None
    plan_check: dict[str, Any] | None = None


def search_plan(job: Job, config: CompressConfig, pruned: Pruned, images: SearchImages) -> Searched:
    """The first branch's search and, with ``branches=2``, the second's over its residual."""
    subset = images.search
    if config.search_loss == "kd" and config.mode != "data-free":
        subset = soft_labelled(job.model, subset, job.device)
    sconf = search_config(config)
    model, candidates = job.model, pruned.candidates
    chosen, history = search_branch(
        model, candidates, pruned.costs, pruned.fixed, pruned.total, config.reduction, sconf, subset, job.device, job.seed,
        job.progress, job.seconds, "", job.checkpoints, pruned.derivation,
    )
    plan = Plan({n: chosen.get(n, []) for n in job.targets})
    stages = [candidates]
    branch_reports: dict[str, Any] = {}
    histories: Any = history
    if config.branches == 2:
        t0 = time.perf_counter()
        if ddp.is_main():
            compressed_b1 = apply_plan(copy.deepcopy(model), plan, derivation=pruned.derivation)
            b1 = build_report(model, compressed_b1, plan, job.infos, job.shape, job.data, job.device, {}, latency=False, reference=job.reference)
            branch_reports["b1"] = {k: b1[k] for k in ("flops", "params", "top1", "top5")} | {"plan": plan.to_dict()}
        cands2, fixed2 = second_branch_candidates(
            model, job.infos, plan, pruned.costs, pruned.total, config.objective, config.max_groups,
            lambda name, rank: m if rank % (m := layer_rank_multiple(job, config, name)) == 0 else 1)
        if pruned.latency is not None and cands2:
            fixed2 = attach_second_branch(model, cands2, candidates, plan.layers, pruned.latency, latency_table(job, config))
            stages.append(cands2)
        job.seconds["b1_evaluate"] = time.perf_counter() - t0
        if cands2:
            sconf2 = copy.deepcopy(sconf)
            sconf2.epochs = max(1, sconf.epochs // 2)  # the paper: 50 epochs for the second branch, 100 for the first
            costs2 = {n: c.cost(config.objective) for n, c in cands2.items()}
            chosen2, history2 = search_branch(
                model, cands2, costs2, fixed2, pruned.total, config.reduction, sconf2, subset, job.device, job.seed + 1,
                job.progress, job.seconds, "b2_", job.checkpoints, pruned.derivation,
            )
            for n, specs in chosen2.items():
                plan.layers[n] = specs
            histories = {"b1": history, "b2": history2}
    hist = {k: v.to_dict() for k, v in histories.items()} if isinstance(histories, dict) else histories.to_dict()
    return Searched(plan, hist, stages, branch_reports, sconf)


def check_plan(job: Job, config: CompressConfig, pruned: Pruned, images: SearchImages, searched: Searched) -> Searched:
    """The search's plan beside the spectrum allocations' (plain and weighted by each layer's
    sensitivity), all scored on the proxy images, the best kept (see :mod:`svdnas.search.allocation`). Only where both are defined: an output-aware
    derivation, a ``--reduction`` on FLOPs or params, one branch, proxy images, and not
    ``--keep-search-plan``. The allocation's options reach below the search's window (the whole
    grid, 0.05-0.95 of each layer's cost) where a lower rank cannot be slower: with
    ``--offer-slower``, or where the layer's ranks are whole channel blocks, in which ONNX Runtime's
    latency falls with the rank (``benchmarks/diagnostics/rank_staircase.py``)."""
    if (config.keep_search_plan or pruned.derivation.plain or config.reduction is None or config.objective == "latency"
            or config.branches != 1 or images.proxy is None or not len(images.proxy)):
        return searched
    wide = fraction_grid(0.05, 0.95)
    opts = allocation.options(pruned.candidates, lambda name: layer_grid(job, config, name, wide),
                              lambda name: config.offer_slower or layer_rank_multiple(job, config, name) > 1)
    plan, summary = allocation.check_against_allocation(
        job.model, searched.plan, opts, pruned.derivation, config.objective, config.reduction, pruned.total, pruned.fixed,
        images.proxy, job.device, job.closeness_on(images.proxy),
    )
    job.seconds["plan_check"] = summary["seconds"]
    if "skipped" in summary:
        log.warning("plan check skipped: %s", summary["skipped"])
    else:
        log.info("plan check on %d proxy images: mean KL %s; kept the %s plan", summary["images"],
                 ", ".join(f"{v:.4g} ({k})" for k, v in summary["kl"].items()), summary["kept"])
        if "weighted_skipped" in summary:
            log.warning("plan check: no sensitivity-weighted plan (%s)", summary["weighted_skipped"])
    history = searched.history | {"plan_from": PLAN_FROM[summary["kept"]]}
    return dataclasses.replace(searched, plan=plan, history=history, plan_check=summary)


def meet_latency_budget(job: Job, config: CompressConfig, pruned: Pruned, searched: Searched) -> Searched:
    """The latency objective's plan selected again from the search's logits until the whole model,
    timed end to end against the original in the report's runtime (at the table's batch and
    threads), meets the budget (see :mod:`svdnas.search.measured_budget`); one branch only."""
    if config.objective != "latency" or config.reduction is None or pruned.latency is None:
        return searched
    if config.branches != 1:
        log.warning("with two branches the latency budget is met on the latency table's prediction only, not on the whole "
                    "model measured (the report's latency block gives the measured reduction)")
        return searched
    t0 = time.perf_counter()
    names = list(pruned.candidates)
    cands = pruned.candidates
    logits = searched.history["logits"]
    scores, costs = [logits[n] for n in names], [pruned.costs[n] for n in names]
    upgrades = [cands[n].next_rank() for n in names]
    runtime = config.runtime or default_runtime()
    batch, threads = pruned.latency.table["batch"], pruned.latency.table["threads"]

    def select(budget: float) -> tuple[Plan, list[int]]:
        choice = select_within_budget(scores, costs, budget, pruned.fixed, upgrades)
        plan = Plan({n: [] for n in job.targets})
        for n, c in zip(names, choice):
            plan.layers[n] = cands[n].branches(c)
        return plan, choice

    def predicted(picked: tuple[Plan, list[int]]) -> float:
        return pruned.fixed + sum(k[c] for k, c in zip(costs, picked[1]))

    def measure(picked: tuple[Plan, list[int]]) -> dict[str, float]:
        model = _standard_memory(apply_plan(copy.deepcopy(job.model), picked[0]))  # timing does not depend on the factors' values
        return compare_latency(job.model, model, job.shape, runtime, batch=batch, threads=threads, device=job.device)

    outcome = None
    if ddp.is_main():  # under torchrun rank 0 measures (the processes would disturb each other) and tells the others
        result = meet_measured_budget(select, predicted, measure, config.reduction, (1 - config.reduction) * pruned.total)
        block = result.to_dict() | {"runtime": runtime, "batch": batch, "threads": threads}
        for attempt in block["attempts"]:
            attempt["predicted_reduction"] = 1 - attempt["predicted"] / pruned.total
            attempt["budget_ms"], attempt["predicted_ms"] = attempt.pop("budget") / NS_PER_MS, attempt.pop("predicted") / NS_PER_MS
        outcome = (result.plan, block)
    (plan, kept), block = ddp.broadcast_object(outcome)
    job.seconds["latency_budget"] = time.perf_counter() - t0
    history = searched.history | {"choice": dict(zip(names, kept))}
    return dataclasses.replace(searched, plan=plan, history=history, measured_budget=block)


@dataclass
class Recovered:
    """The recovery's report block (None in post-training) and the synthetic images it learned on."""

    block: dict[str, Any] | None
    synthetic: SyntheticSplits | None


def recover(
    job: Job, mode: str, compressed: nn.Module, plan: Plan, finetune: FinetuneConfig | None,
    synthetic: SyntheticSplits | None = None, make_synthetic: Callable[[], SyntheticSplits] | None = None,
) -> Recovered:
    """Distil ``compressed`` (in place) from the job's model in ``mode``; nothing in ``post-training``.

    Args:
        synthetic: synthetic images already made (data-free searched on them).
        make_synthetic: makes them where the mode needs them and none were given.
    """
    job.seconds["finetune"] = 0.0
    if mode == "post-training":
        return Recovered(None, synthetic)
    before = evaluate(compressed, job.data.test, job.device) if job.data is not None and ddp.is_main() else None
    if mode in ("synthetic", "data-free") and synthetic is None and make_synthetic is not None:
        synthetic = make_synthetic()
    ckpt = job.checkpoints / "checkpoint-finetune.pt" if job.checkpoints is not None else None
    fconf = finetune or FinetuneConfig(mode="synthetic" if mode == "data-free" else mode)
    # dropout and drop-path draw from the global generator: seeded here, the caller's state restored after
    with torch.random.fork_rng(devices=[job.device] if job.device.type == "cuda" else []):
        torch.manual_seed(job.seed)
        block = distil(job.model, compressed, plan, mode, fconf, job.data, synthetic, job.device, job.seed, ckpt, job.ticker("finetune"))
    job.seconds["finetune"] = block["seconds"]
    if before is not None:
        block["before"] = before
    return Recovered(block, synthetic)


def report(
    job: Job, compressed: nn.Module, plan: Plan, header: dict[str, Any], recovered: Recovered | None = None, **timing: Any,
) -> dict[str, Any]:
    """The report: costs, accuracy on the whole test split, latency, recovery and fidelity, per-layer plan."""
    t0 = time.perf_counter()
    out = build_report(job.model, compressed, plan, job.infos, job.shape, job.data, job.device, header, reference=job.reference, progress=job.progress, **timing)
    if recovered is not None and recovered.block is not None:
        if job.data is not None:
            recovered.block["after"] = {"top1": out["top1"]["compressed"], "top5": out["top5"]["compressed"]}
        out["recovery"] = recovered.block
    splits = recovered.synthetic if recovered is not None else None
    if splits is not None:
        out["fidelity"] = fidelity(compressed, job.model, splits.test, job.device)
        out["synthetic"] = synthetic_summary(splits.meta) | {"images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}}
    job.seconds["evaluate"] = time.perf_counter() - t0
    return out


def finish(job: Job, report: dict[str, Any]) -> None:
    """The report's closing keys: seconds per stage, peak memory and the layers left alone."""
    job.seconds["total"] = time.perf_counter() - job.started
    report["seconds"] = dict(job.seconds)
    # cumulative: the process's peak so far at the end of each stage (the search's own cost is
    # where the value grows); measured, not estimated
    report["peak_memory_mib"] = job.seconds.peak_mib
    report["skipped"] = [{"name": n, "reason": r} for n, r in job.skipped.items()]


def write(job: Job, compressed: nn.Module, plan: Plan, report: dict[str, Any], **extra: Any) -> None:
    """The run directory (nothing without one); the stages' checkpoints are removed once it is whole."""
    if job.run is None:
        return
    write_run(job.run.path, compressed, plan, job.run.base, job.shape, report, **extra)
    for ckpt in [*job.run.path.glob("checkpoint-*.pt"), *job.run.path.glob("checkpoint-*.json")]:
        ckpt.unlink()


def check_data(mode: str, data: DataBundle | None) -> None:
    if data is None and mode != "data-free":
        raise DataError(f"--mode {mode} needs real data: --data none works only with --mode data-free")


def _stopped(history: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Why the (first branch's) search ended: ``stable`` (the stopping rule) or ``epochs``, after how many of how many."""
    first = history.get("b1", history)
    return {"reason": first.get("stopped", "epochs"), "epochs": len(first.get("epoch", [])), "of": epochs}


def _run_path(job: Job) -> Path | None:
    return job.run.path if job.run is not None else None


def search_header(job: Job, config: CompressConfig, sconf: SearchConfig) -> dict[str, Any]:
    """The report's first keys for an SVD-NAS run."""
    return {
        "model": job.run.base if job.run is not None else PYTHON_BASE,
        "method": "svdnas", "mode": config.mode, "objective": config.objective, "seed": job.seed,
        "reduction_target": config.reduction, "beta": config.beta, "sampling": sconf.sampling,
        "search_dtype": str(window_dtype(sconf.window_dtype, job.device)).removeprefix("torch.") if sconf.sampling == "mixed" else None,
        "search_loss": "kd" if config.mode == "data-free" else config.search_loss,
        "derivation": config.derivation, "rank_multiple": rank_multiple(job, config),
    }


def search_summary(job: Job, config: CompressConfig, pruned: Pruned, searched: Searched, images: SearchImages) -> dict[str, Any]:
    """The report's keys on the search: its data, the accuracy proxy, its settings and the branches."""
    synthetic = config.mode == "data-free"
    data = job.data
    out: dict[str, Any] = {"data": {
        "spec": data.name if data is not None else "none", "search_images": len(images.search),
        "search_split": "synthetic images with the original model's soft labels" if synthetic else "train (fixed subset drawn with --seed)",
        "proxy_images": len(images.proxy) if images.proxy is not None else 0,
        "proxy_split": "synthetic images, apart from the search images" if synthetic else "train, apart from the search images",
        "processes": ddp.world_size(),
        "evaluation_images": len(data.test) if data is not None else 0, "evaluation_split": "test" if data is not None else None,
    }}
    if pruned.timed is not None:
        out["slower_candidates"] = pruned.timed
    if pruned.accuracy_proxy is not None:
        out["accuracy_proxy"] = pruned.accuracy_proxy
    out["search"] = {
        "config": asdict(searched.config), "grid": config.fractions(),
        "candidates": sum(len(c) - 1 for c in pruned.candidates.values()), "branches": config.branches,
        "stopped": _stopped(searched.history, searched.config.epochs),
    }
    if searched.plan_check is not None:
        out["plan_check"] = searched.plan_check
    if job.calibration is not None:
        out["calibration"] = job.calibration
    if pruned.latency is not None:
        out["latency_predicted"] = predicted_report(searched.stages, searched.plan.layers, pruned.latency)
    return out


__all__ = [
    "Job", "Pruned", "Recovered", "SearchImages", "Searched", "calibrate", "calibration_set", "check_data", "check_plan", "derive_model",
    "finish", "layer_grid", "make_candidates", "meet_latency_budget", "prepare",
    "prune", "recover", "report", "search_header", "search_images", "search_plan", "search_summary", "write",
]
