"""The competitors the paper compares with, each meeting the same budget.

- ``uniform``: one rank fraction (of each layer's full rank) for every layer.
- ``energy`` (TRP-style): per layer, the smallest rank keeping a share of sum(sigma^2); one share for all.
- ``lrs2`` (Idelbayev and Carreira-Perpinan 2020, data-free as SVD-NAS ran it): the spatially
  separable split, and per layer the singular values with sigma^2 >= lambda x the layer's MACs.
- ``alds`` (Liebenwein et al. 2021): per layer k channel subspaces and a rank, minimising the
  largest relative error over the layers (:mod:`svdnas.alds`).
- ``fgroup`` (Peng et al. 2018): the published filter-group pattern (:mod:`svdnas.fgroup`), its
  ranks scaled by one common factor.
- ``balf`` (Gonzalez-Martinez 2025, arXiv 2509.25136): the whole kernel in the first layer, then a
  1x1; per layer the share of its whitened energy a rank keeps, summed over the layers and maximised
  under the budget by bisection on a Lagrange multiplier (a rank is kept while its share of the
  layer's energy per unit of cost is above the multiplier).

``energy``, ``lrs2`` and ``balf`` read each layer's spectrum: the weight's, or with an output-aware
derivation the whitened one (``balf``'s own).

``uniform`` and ``energy`` take a kernel split (``kxk``, ``1x1``, ``kx1``, ``1xk``: what the first
layer holds) or ``best`` (each split in turn, keeping the most accurate on the search images); the
other three have the split their papers fix. Except for ``alds``, which solves its problem
directly, one knob is bisected so that the whole model's reduction reaches the target; a layer
whose decomposition would cost at least as much as the layer itself is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdnas.baselines.alds import alds_plan
from svdnas.baselines.fgroup import fgroup_pattern
from svdnas.cost.counting import layer_cost, rank_cost
from svdnas.errors import BudgetError, SpecError
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.spec import LowRankSpec, family_max_rank
from svdnas.surgery.trace import LayerInfo

logger = logging.getLogger(__name__)

METHODS = ("uniform", "energy", "lrs2", "alds", "fgroup", "balf")
SPLITS = ("kxk", "1x1", "kx1", "1xk")
FIXED_SPLITS = {"lrs2": "kx1", "alds": "kxk", "fgroup": "kxk", "balf": "kxk"}  # methods whose paper fixes the split
SPECTRAL = ("energy", "lrs2", "balf")  # methods whose ranks follow each layer's spectrum


def split_kernel(split: str, kernel: tuple[int, int]) -> tuple[int, int]:
    """First-layer kernel of a named split for a layer of ``kernel``."""
    if split not in SPLITS:
        raise SpecError(f"--split must be one of {', '.join(SPLITS)} or best, got {split!r}")
    return (kernel[0] if split[0] == "k" else 1, kernel[1] if split[2] == "k" else 1)


@dataclass
class _Layer:
    name: str
    family: LowRankSpec  # split and groups; the rank is what the knob sets
    max_rank: int
    cost0: float
    unit: float  # cost of one more rank
    base: float  # cost at rank 0 (a bias counted in params)
    sigma2: torch.Tensor | None = None  # squared singular values, descending (uniform, energy, lrs2)
    pattern_rank: int = 0  # fgroup: the rank of the published pattern

    def cost(self, rank: int) -> float:
        return self.base + self.unit * rank


def _make_layer(m: nn.Module, name: str, hw: tuple[int, int], family: LowRankSpec, max_rank: int, objective: str) -> _Layer:
    macs0, params0 = layer_cost(m, hw)
    base, unit = rank_cost(m, hw, family, objective)
    return _Layer(name, family, max_rank, float(params0 if objective == "params" else macs0), unit, base)


def split_specs(targets: Sequence[str], model: nn.Module, split: str) -> dict[str, list[LowRankSpec]]:
    """Each target layer's family under ``split`` (rank 1): what a derivation's statistics must cover."""
    out = {}
    for name in targets:
        weight = conv_weight(model.get_submodule(name))
        out[name] = [LowRankSpec(split_kernel(split, (weight.shape[2], weight.shape[3])))]
    return out


def _prepare(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str], split: str, objective: str,
             derivation: Derivation | None = None) -> list[_Layer]:
    derivation = derivation or Derivation()
    layers = []
    for name in targets:
        m = model.get_submodule(name)
        weight = conv_weight(m)
        first = split_kernel(split, (weight.shape[2], weight.shape[3]))
        s = derivation.spectrum(name, weight.detach(), (first, (1, 1)))[0]
        layer = _make_layer(m, name, infos[name].input_hw, LowRankSpec(first), len(s), objective)
        layer.sigma2 = s.pow(2)
        layers.append(layer)
    return layers


def _prepare_fgroup(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str], objective: str,
                    spare_last: bool) -> list[_Layer]:
    """The layers F-Group compresses; with ``spare_last`` the last stage is left alone, as published."""
    pattern = fgroup_pattern(model, infos, targets)
    last = max(p.stage for p in pattern.values())
    layers = []
    for name, (stage, spec) in pattern.items():
        if spare_last and stage == last:
            continue
        m = model.get_submodule(name)
        o, i, kh, kw = conv_weight(m).shape
        layer = _make_layer(m, name, infos[name].input_hw, spec, family_max_rank(spec, o, i, (kh, kw)), objective)
        layer.pattern_rank = spec.rank
        layers.append(layer)
    return layers


def _fgroup_reach(layers: list[_Layer]) -> float:
    """The largest factor by which a published rank can grow before reaching its layer's full rank."""
    return max((layer.max_rank / layer.pattern_rank for layer in layers), default=1.0)


def _threshold_rule(ratios: dict[str, torch.Tensor]) -> Callable[[_Layer, float], int]:
    """Keep rank k of a layer while its (descending) ratio is at least lambda; the knob moves lambda
    log-linearly from the largest first ratio in the model (rank 1 everywhere) to the smallest last one
    (full rank)."""
    logs = {name: r.clamp_min(1e-300).log() for name, r in ratios.items()}
    top = max(r[0].item() for r in logs.values())
    bottom = min(r[-1].item() for r in logs.values())

    def rule(layer: _Layer, t: float) -> int:
        log_lam = top + t * (bottom - top)
        return max(1, int((logs[layer.name] >= log_lam - 1e-9).sum()))

    return rule


def _rank_rule(method: str, layers: list[_Layer], macs0: dict[str, float]) -> Callable[[_Layer, float], int]:
    """knob in [0, 1] -> rank; non-decreasing in the knob for every method."""
    if method == "uniform":
        return lambda layer, t: max(1, round(t * layer.max_rank))
    if method == "energy":
        shares = {layer.name: layer.sigma2.cumsum(0) / layer.sigma2.sum().clamp_min(1e-30) for layer in layers}

        def energy(layer: _Layer, t: float) -> int:
            share = shares[layer.name]
            return int(min(len(share), int((share < t - 1e-12).sum()) + 1))

        return energy
    if method == "lrs2":
        # keep sigma_k^2 >= lambda * (the layer's MACs); the knob moves lambda log-linearly from
        # the largest ratio in the model (rank 1 everywhere) to the smallest (full rank)
        return _threshold_rule({layer.name: layer.sigma2 / macs0[layer.name] for layer in layers})
    if method == "balf":
        # keep rank k while its share of the layer's energy per unit of cost is at least lambda; the
        # knob moves lambda log-linearly from the largest such ratio (rank 1 everywhere) to the smallest
        return _threshold_rule({layer.name: layer.sigma2 / layer.sigma2.sum().clamp_min(1e-300) / max(layer.unit, 1e-30) for layer in layers})
    if method == "fgroup":
        # one factor, knob x reach, scales every published rank; knob 1 puts each layer at its full rank
        reach = _fgroup_reach(layers)
        return lambda layer, t: min(layer.max_rank, max(1, round(t * reach * layer.pattern_rank)))
    raise SpecError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")


def _plan_at(layers: list[_Layer], rule: Callable[[_Layer, float], int], knob: float) -> tuple[Plan, float]:
    plan = Plan()
    kept = 0.0
    for layer in layers:
        r = rule(layer, knob)
        if layer.cost(r) < layer.cost0:
            plan.layers[layer.name] = [layer.family.with_rank(r)]
            kept += layer.cost(r)
        else:
            plan.layers[layer.name] = []
            kept += layer.cost0
    return plan, kept


class _OverBudget(Exception):
    """The cheapest plan of a method costs more than its budget."""

    def __init__(self, cheapest: float, what: str) -> None:
        super().__init__(what)
        self.cheapest, self.what = cheapest, what


def _bisect(layers: list[_Layer], rule: Callable[[_Layer, float], int], budget: float) -> tuple[Plan, float]:
    """The plan at the largest knob whose layers cost at most ``budget``, and that knob.

    Raises:
        _OverBudget: if the smallest knob already costs more.
    """
    lo_plan, lo_kept = _plan_at(layers, rule, 0.0)
    if lo_kept > budget:
        raise _OverBudget(lo_kept, "rank 1 everywhere")
    lo, hi = 0.0, 1.0
    best = lo_plan
    for _ in range(50):
        mid = (lo + hi) / 2
        plan, kept = _plan_at(layers, rule, mid)
        if kept <= budget:
            lo, best = mid, plan
        else:
            hi = mid
    return best, lo


def _fgroup(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str], layers_budget: float,
            objective: str) -> tuple[Plan, dict[str, Any]]:
    """F-Group's plan: the last stage left alone as published, unless the budget needs it too."""
    try:
        return _fgroup_at(model, infos, targets, layers_budget, objective, spare_last=True)
    except _OverBudget:
        logger.warning("fgroup: the budget cannot be met with the last stage left alone; compressing it too")
        return _fgroup_at(model, infos, targets, layers_budget, objective, spare_last=False)


def _fgroup_at(model: nn.Module, infos: dict[str, LayerInfo], targets: Sequence[str], layers_budget: float,
               objective: str, spare_last: bool) -> tuple[Plan, dict[str, Any]]:
    layers = _prepare_fgroup(model, infos, targets, objective, spare_last)
    kept = {layer.name for layer in layers}
    spared = [n for n in targets if n not in kept]
    budget = layers_budget - sum(_costs0(model, infos, spared, objective))
    plan, knob = _bisect(layers, _rank_rule("fgroup", layers, {}), budget)
    plan.layers = {n: plan.layers.get(n, []) for n in targets}
    return plan, {"rank_scale": knob * _fgroup_reach(layers), "last_stage_left_alone": spare_last}


def _costs0(model: nn.Module, infos: dict[str, LayerInfo], names: Sequence[str], objective: str) -> list[float]:
    """The original costs of layers ``names``."""
    return [float(layer_cost(model.get_submodule(n), infos[n].input_hw)[1 if objective == "params" else 0]) for n in names]


def plan_and_notes(
    method: str,
    model: nn.Module,
    infos: dict[str, LayerInfo],
    targets: Sequence[str],
    reduction: float,
    total: float,
    split: str,
    objective: str,
    derivation: Derivation | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """The plan of ``method`` and what the method chose on the way (for the report).

    Args:
        derivation: whose spectra the spectral methods read (None: the weight's).
    """
    if method not in METHODS:
        raise SpecError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    split = FIXED_SPLITS.get(method, split)
    fixed = total - sum(_costs0(model, infos, targets, objective))  # what the filter leaves out
    layers_budget = (1 - reduction) * total - fixed
    try:
        if method == "alds":
            plan, worst = alds_plan(model, infos, targets, layers_budget, objective)
            return plan, {"max_relative_error": worst}
        if method == "fgroup":
            return _fgroup(model, infos, targets, layers_budget, objective)
        layers = _prepare(model, infos, targets, split, objective, derivation if method in SPECTRAL else None)
        macs0 = dict(zip(targets, _costs0(model, infos, targets, "flops")))
        plan, knob = _bisect(layers, _rank_rule(method, layers, macs0), layers_budget)
        return plan, {"knob": knob}
    except BudgetError as e:
        raise BudgetError(f"--reduction {reduction} cannot be met by {method}: {e}") from None
    except _OverBudget as e:
        raise BudgetError(
            f"--reduction {reduction} cannot be met by {method}: {e.what} reaches {1 - (e.cheapest + fixed) / total:.3f}"
        ) from None


def baseline_plan(
    method: str,
    model: nn.Module,
    infos: dict[str, LayerInfo],
    targets: Sequence[str],
    reduction: float,
    total: float,
    split: str = "kx1",
    objective: str = "flops",
    derivation: Derivation | None = None,
) -> Plan:
    """The plan of ``method`` whose whole-model cost is at most (1 - reduction) x ``total``.

    Args:
        total: the original model's whole cost on the objective (MACs or params).
        split: the kernel split of ``uniform`` and ``energy``; the other methods fix their own.
    """
    return plan_and_notes(method, model, infos, targets, reduction, total, split, objective, derivation)[0]


