"""The competitors the paper compares with, each tuned by one knob to meet the same budget.

- ``uniform``: one rank fraction (of each layer's full rank) for every layer.
- ``energy`` (TRP-style): per layer, the smallest rank keeping a share of sum(sigma^2); one share for all.
- ``lrs2`` (Idelbayev and Carreira-Perpinan 2020, data-free as SVD-NAS ran it): the spatially
  separable split, and per layer the singular values with sigma^2 >= lambda x the layer's MACs.

``uniform`` and ``energy`` take a kernel split (``kxk``, ``1x1``, ``kx1``, ``1xk``: what the first
layer holds) or ``best`` (each split in turn, keeping the most accurate on the search images).
The knob is bisected so that the whole model's reduction reaches the target; a layer whose
decomposition would cost more than the layer itself is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from svdnas import functional as LF
from svdnas.cost import layer_cost
from svdnas.errors import BudgetError, SpecError
from svdnas.plan import Plan
from svdnas.spec import LowRankSpec
from svdnas.surgery import LayerInfo

METHODS = ("uniform", "energy", "lrs2")
SPLITS = ("kxk", "1x1", "kx1", "1xk")


def split_kernel(split: str, kernel: tuple[int, int]) -> tuple[int, int]:
    """First-layer kernel of a named split for a layer of ``kernel``."""
    if split not in SPLITS:
        raise SpecError(f"--split must be one of {', '.join(SPLITS)} or best, got {split!r}")
    return (kernel[0] if split[0] == "k" else 1, kernel[1] if split[2] == "k" else 1)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    hw: tuple[int, int]
    first: tuple[int, int]
    sigma2: torch.Tensor  # squared singular values, descending
    cost0: float
    unit: float  # cost of one more rank
    base: float  # cost at rank 0 (a bias counted in params)

    def cost(self, rank: int) -> float:
        return self.base + self.unit * rank


def _prepare(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str], split: str, objective: str) -> list[_Layer]:
    layers = []
    for name in targets:
        m = model.get_submodule(name)
        weight = m.weight if isinstance(m, nn.Conv2d) else m.weight[:, :, None, None]
        kernel = (weight.shape[2], weight.shape[3])
        first = split_kernel(split, kernel)
        s = LF.svd(weight, first, (1, 1)).s[0].double()
        macs0, params0 = layer_cost(m, infos[name].input_hw)
        m1, p1 = layer_cost(m, infos[name].input_hw, [LowRankSpec(first, (1, 1), 1)])
        m2, p2 = layer_cost(m, infos[name].input_hw, [LowRankSpec(first, (1, 1), 2)]) if len(s) > 1 else (2 * m1, 2 * p1)
        cost0, c1, unit = (params0, p1, p2 - p1) if objective == "params" else (macs0, m1, m2 - m1)
        layers.append(_Layer(name, m, infos[name].input_hw, first, s.pow(2), float(cost0), float(unit), float(c1 - unit)))
    return layers


def _rank_rule(method: str, layers: list[_Layer], macs0: dict[str, float]) -> Callable[[_Layer, float], int]:
    """knob in [0, 1] -> rank; non-decreasing in the knob for every method."""
    if method == "uniform":
        return lambda layer, t: max(1, round(t * len(layer.sigma2)))
    if method == "energy":
        shares = {layer.name: layer.sigma2.cumsum(0) / layer.sigma2.sum().clamp_min(1e-30) for layer in layers}

        def energy(layer: _Layer, t: float) -> int:
            share = shares[layer.name]
            return int(min(len(share), int((share < t - 1e-12).sum()) + 1))

        return energy
    if method == "lrs2":
        # keep sigma_k^2 >= lambda * (the layer's MACs); the knob moves lambda log-linearly from
        # the largest ratio in the model (rank 1 everywhere) to the smallest (full rank)
        ratios = {layer.name: (layer.sigma2 / macs0[layer.name]).clamp_min(1e-300).log() for layer in layers}
        top = max(r[0].item() for r in ratios.values())
        bottom = min(r[-1].item() for r in ratios.values())

        def lrs2(layer: _Layer, t: float) -> int:
            log_lam = top + t * (bottom - top)
            return max(1, int((ratios[layer.name] >= log_lam - 1e-9).sum()))

        return lrs2
    raise SpecError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")


def _plan_at(layers: list[_Layer], rule: Callable[[_Layer, float], int], knob: float) -> tuple[Plan, float]:
    plan = Plan()
    kept = 0.0
    for layer in layers:
        r = rule(layer, knob)
        if layer.cost(r) < layer.cost0:
            plan.layers[layer.name] = [LowRankSpec(layer.first, (1, 1), r)]
            kept += layer.cost(r)
        else:
            plan.layers[layer.name] = []
            kept += layer.cost0
    return plan, kept


def baseline_plan(
    method: str,
    model: nn.Module,
    infos: dict[str, LayerInfo],
    targets: Sequence[str],
    reduction: float,
    total: float,
    split: str = "kx1",
    objective: str = "flops",
) -> Plan:
    """The plan of ``method`` whose whole-model cost is at most (1 - reduction) x ``total``.

    Args:
        total: the original model's whole cost on the objective (MACs or params).
    """
    if method == "lrs2":
        split = "kx1"
    layers = _prepare(model, infos, targets, split, objective)
    macs0 = {n: float(layer_cost(model.get_submodule(n), infos[n].input_hw)[0]) for n in targets}
    rule = _rank_rule(method, layers, macs0)
    fixed = total - sum(layer.cost0 for layer in layers)
    budget = (1 - reduction) * total - fixed
    lo_plan, lo_kept = _plan_at(layers, rule, 0.0)
    if lo_kept > budget:
        raise BudgetError(
            f"--reduction {reduction} cannot be met by {method}: rank 1 everywhere reaches {1 - (lo_kept + fixed) / total:.3f}"
        )
    lo, hi = 0.0, 1.0
    best = lo_plan
    for _ in range(50):
        mid = (lo + hi) / 2
        plan, kept = _plan_at(layers, rule, mid)
        if kept <= budget:
            lo, best = mid, plan
        else:
            hi = mid
    return best


def run_baseline(
    method: str,
    model: nn.Module,
    data,
    reduction: float,
    input_shape: tuple[int, int, int] | None = None,
    filter_fn="all-but-first",
    split: str = "kx1",
    objective: str = "flops",
    search_images: int = 1000,
    device: torch.device | str = "cpu",
    seed: int = 0,
    out=None,
    model_spec: str = "python:model",
    reference: dict[str, float] | None = None,
):
    """A baseline end to end: plan, derivation, evaluation, report and run directory.

    Returns:
        (compressed model, plan, report).
    """
    import copy
    import time

    from svdnas.cost import count_params, model_macs
    from svdnas.data import search_subset
    from svdnas.evaluate import evaluate
    from svdnas.runreport import build_report, write_run
    from svdnas.surgery import apply_plan, example_input, require_targets, trace_layers
    from svdnas.weights import check_finite

    if method not in METHODS:
        raise SpecError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < reduction < 1:
        raise SpecError(f"--reduction must be in (0, 1), got {reduction}")
    t_start = time.perf_counter()
    shape = tuple(input_shape or data.input_shape)
    model = model.to(device).eval()
    check_finite(model.state_dict(), "the model")
    infos = trace_layers(model, example_input(model, shape))
    targets, skipped = require_targets(model, infos, filter_fn)
    total = float(model_macs(model, shape) if objective == "flops" else count_params(model))
    splits = list(SPLITS) if split == "best" and method != "lrs2" else [split]
    chosen = None
    tried = {}
    for sp in splits:
        plan = baseline_plan(method, model, infos, targets, reduction, total, sp, objective)
        compressed = apply_plan(copy.deepcopy(model), plan)
        if len(splits) > 1:
            subset, _ = search_subset(data.train, search_images, seed)
            tried[sp] = evaluate(compressed, subset, device)["top1"]
            if chosen is None or tried[sp] > tried[chosen[0]]:
                chosen = (sp, plan, compressed)
        else:
            chosen = (sp, plan, compressed)
    sp, plan, compressed = chosen  # type: ignore[misc]
    seconds = {"search": time.perf_counter() - t_start, "finetune": 0.0}
    header = {"model": model_spec, "method": method, "mode": "post-training", "objective": objective, "seed": seed,
              "reduction_target": reduction, "split": sp}
    report = build_report(model, compressed, plan, infos, shape, data, device, header, reference=reference)
    if tried:
        report["split_search"] = {"search_images": search_images, "top1_on_search_images": tried}
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = seconds
    report["skipped"] = [{"name": n, "reason": r} for n, r in skipped.items()]
    if out is not None:
        write_run(out, compressed, plan, model_spec, shape, report)
    return compressed, plan, report
