"""Plans from the spectra alone, and the check that keeps the best of them and the search's.

With an output-aware derivation every candidate's relative output error is read from its family's
whitened spectrum, with no image. Minimising the summed errors within the budget (the same
multiple-choice knapsack as the search's selection) is BALF's allocation, but over the families
the search kept: its options are the search's candidates and, below them, every smaller rank of
the same families on the whole grid. Where the search's candidates are a window around the
target, the allocation may compress a few layers far and leave the rest, as BALF does. At small
reductions, where the search's loss barely separates its options, this plan can be the better
one; elsewhere the search's. A third plan is the same allocation with each layer's errors
weighted by how much an error there moves the model's output (:func:`layer_sensitivity`), since a
relative error costs more in some layers than in others. All three are scored on the proxy images
(the accuracy proxy's, apart from the search images) by the mean KL divergence of the compressed
model's softmax from the original's (no label needed, so it works on synthetic images too), and the
lowest is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from svdnas import distributed as ddp
from svdnas.data.evaluate import batches
from svdnas.errors import BudgetError
from svdnas.hooks import evaluation_mode, forward_hooks
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.whiten import rank_errors
from svdnas.search.branch import choose
from svdnas.search.candidates import LayerCandidates
from svdnas.search.output_proxy import relative_error
from svdnas.surgery.swap import apply_plan

log = logging.getLogger(__name__)


def options(candidates: dict[str, LayerCandidates], wide: Callable[[str], LayerCandidates],
            below: Callable[[str], bool]) -> dict[str, LayerCandidates]:
    """The allocation's options: per layer, the search's candidates and, where ``below(name)``,
    the candidates of ``wide(name)`` (the layer on the whole grid) whose family the search kept at
    a rank below the smallest it offers there. Ranks the search left out above that (measured
    slower than the layer) stay out; ranks below it come back even where the accuracy proxy removed
    them, the check on the whole model standing in for it."""
    out = {}
    for name, cands in candidates.items():
        if not below(name):
            out[name] = cands
            continue
        low: dict[tuple, int] = {}
        for spec in cands.specs:
            low[spec.family()] = min(low.get(spec.family(), spec.rank), spec.rank)
        extra = wide(name).subset(lambda s, low=low: s.family() in low and s.rank < low[s.family()])
        out[name] = LayerCandidates(
            cands.name, cands.input_hw, cands.specs + extra.specs, cands.macs + extra.macs[1:], cands.params + extra.params[1:],
            cands.prefix, cands.base,
        )
    return out


@torch.no_grad()
def spectrum_scores(model: nn.Module, candidates: dict[str, LayerCandidates], derivation: Derivation) -> dict[str, list[float]]:
    """Per layer, minus each candidate's relative output error read from its family's spectrum
    (0 for the original layer, index 0); one spectrum per family. First-branch candidates only."""
    scores = {}
    for name, cands in candidates.items():
        if cands.prefix:
            raise ValueError(f"{name}: spectrum scores are for first-branch candidates")
        weight = conv_weight(model.get_submodule(name)).detach()
        tails = {fam: rank_errors(derivation.spectrum(name, weight, fam)) for fam in {s.family() for s in cands.specs}}
        scores[name] = [0.0] + [-relative_error(tails[s.family()], s.rank) for s in cands.specs]
    return scores


def layer_sensitivity(model: nn.Module, names: Sequence[str], images: Dataset, device: torch.device | str,
                      seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Per layer, how much the model's mean KL divergence from itself grows per unit of that layer's
    relative output error: the second-order (Fisher) estimate ``E[|g|^2 |y|^2] / (2 D)``, with ``y``
    the layer's output on an image less its bias, ``D`` its size and ``g`` the gradient there of the
    log-probability of a label drawn from the model's own softmax (so that ``E[g g^T]`` is the KL's
    curvature). It assumes the error spreads over the output evenly; what it gives is the layers'
    relative weights. One forward and backward pass over ``images``; the model (each module's mode
    included) is left as it was. A layer the gradient never reached (its output detached on the way)
    gets the mean of the others' weights, as nothing is known of it; 0 if no layer was reached."""
    modules = {n: model.get_submodule(n) for n in names}
    outputs: dict[str, list[Tensor]] = {}

    def keep(name):
        def hook(m, a, out):
            out = out if out.requires_grad else out.detach().requires_grad_()
            outputs.setdefault(name, []).append(out)
            return out.clone()  # what runs next may work in place (ReLU(inplace=True)); the kept output stays as it was
        return hook

    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(names, 0.0)
    reached: set[str] = set()
    count = 0
    with evaluation_mode(model), forward_hooks([(m, keep(n)) for n, m in modules.items()]), torch.enable_grad():
        for x, _ in batches(images, batch_size):
            logits = model(x.to(device)).float()
            drawn = torch.multinomial(F.softmax(logits.detach(), -1).cpu(), 1, generator=generator).to(logits.device)
            chosen = F.log_softmax(logits, -1).gather(1, drawn).sum()
            found = [(n, t) for n in names for t in outputs.get(n, [])]
            grads = torch.autograd.grad(chosen, [t for _, t in found], allow_unused=True)
            for (n, out), g in zip(found, grads):
                if g is None:
                    continue
                reached.add(n)
                y = out.detach().double()
                bias = getattr(modules[n], "bias", None)
                if bias is not None:  # a conv's channels are dimension 1; a linear layer's features the last
                    b = bias.detach().double()
                    y = y - (b if isinstance(modules[n], nn.Linear) else b.view(-1, *([1] * (y.dim() - 2))))
                per_image = g.double().flatten(1).square().sum(1) * y.flatten(1).square().sum(1)
                sums[n] += per_image.sum().item() / (2 * y[0].numel())
            count += len(x)
            del logits, chosen, found, grads
            outputs.clear()  # this batch's graph freed before the next one's forward pass
    weights = {n: sums[n] / max(count, 1) for n in names}
    if reached and len(reached) < len(names):
        mean = sum(weights[n] for n in reached) / len(reached)
        log.warning("layer sensitivity: no gradient reached %s; given the mean weight", ", ".join(sorted(set(names) - reached)))
        weights |= {n: mean for n in names if n not in reached}
    return weights


def allocate(model: nn.Module, candidates: dict[str, LayerCandidates], derivation: Derivation, objective: str,
             reduction: float, total: float, fixed: float, targets: Sequence[str], weights: dict[str, float] | None = None) -> Plan:
    """The plan minimising the summed spectrum-read output errors within ``(1 - reduction) * total``,
    each layer's errors times its ``weights`` entry where given (:func:`layer_sensitivity`)."""
    return _allocated(spectrum_scores(model, candidates, derivation), candidates, objective, reduction, total, fixed, targets, weights)


def _allocated(scores: dict[str, list[float]], candidates: dict[str, LayerCandidates], objective: str, reduction: float, total: float,
               fixed: float, targets: Sequence[str], weights: dict[str, float] | None = None) -> Plan:
    """:func:`allocate` from the layers' :func:`spectrum_scores`, read once for both allocations of the check."""
    names = list(candidates)
    if weights is not None:
        scores = {n: [w * weights[n] for w in row] for n, row in scores.items()}
    choice = choose([scores[n] for n in names], [candidates[n].cost(objective) for n in names], reduction, total, fixed,
                    [candidates[n].next_rank() for n in names])
    picked = dict(zip(names, choice))
    return Plan({n: candidates[n].branches(picked[n]) if n in picked else [] for n in targets})


@torch.no_grad()
def log_probs(model: nn.Module, images: Dataset, device: torch.device | str, batch_size: int = 128) -> list[Tensor]:
    """``model``'s log-softmax on ``images``, batch by batch."""
    return [F.log_softmax(model(x.to(device)).float(), -1) for x, _ in batches(images, batch_size)]


@torch.no_grad()
def mean_kl(reference: list[Tensor], model: nn.Module, images: Dataset, device: torch.device | str, batch_size: int = 128) -> float:
    """Mean KL divergence of ``model``'s softmax from the reference's (:func:`log_probs` of the
    same ``images`` and batch size)."""
    total, count = 0.0, 0
    for p, q in zip(reference, log_probs(model, images, device, batch_size)):
        total += F.kl_div(q, p, log_target=True, reduction="sum").item()
        count += len(p)
    return total / max(count, 1)


class Closeness:
    """How near compressed models come to ``model`` on ``images`` by :func:`mean_kl`, the original's
    log-probabilities taken once and each plan's score (under a derivation) once: the plan check
    and the prefix fit's model check score the same plans on the same proxy images."""

    def __init__(self, model: nn.Module, images: Dataset, device: torch.device | str) -> None:
        self.model, self.images, self.device = model, images, device
        self._reference: list[Tensor] | None = None
        self._plans: dict[tuple[str, int], tuple[Derivation, float]] = {}

    def reference(self) -> list[Tensor]:
        """The original model's log-softmax on the images."""
        if self._reference is None:
            with evaluation_mode(self.model):
                self._reference = log_probs(self.model, self.images, self.device)
        return self._reference

    def of_model(self, compressed: nn.Module) -> float:
        """The mean KL of ``compressed`` (put in eval mode) from the original."""
        return mean_kl(self.reference(), compressed.eval(), self.images, self.device)

    def of_plan(self, plan: Plan, derivation: Derivation) -> float:
        """:meth:`of_model` of the original compressed by ``plan`` with ``derivation``'s factors (a
        derivation is scored as it is the first time: it is not to change once scored)."""
        return self.scored(plan, derivation)[0]

    def scored(self, plan: Plan, derivation: Derivation) -> tuple[float, nn.Module | None]:
        """(:meth:`of_plan`, the compressed model in eval mode where it was built for this call, else
        None): a caller who may keep that model need not build it again. Only scores are kept here,
        not models (each would hold memory for the rest of the job)."""
        key = (plan.to_json(), id(derivation))  # the entry holds the derivation, so its id is not reused
        if key in self._plans:
            return self._plans[key][1], None
        compressed = apply_plan(copy.deepcopy(self.model), plan, derivation=derivation)
        self._plans[key] = (derivation, self.of_model(compressed))
        return self._plans[key][1], compressed


def better_plan(model: nn.Module, plans: dict[str, Plan], images: Dataset, device: torch.device | str,
                derivation: Derivation, closeness: Closeness | None = None) -> tuple[str, dict[str, Any]]:
    """The name of the plan in ``plans`` whose compressed model (factors from ``derivation``) is
    nearest the original on ``images`` by :func:`mean_kl`, and each plan's score. Plans that are
    equal are scored once; ties keep the first. ``closeness``: scores kept across calls (on ``images``)."""
    closeness = closeness or Closeness(model, images, device)
    if closeness.model is not model or closeness.images is not images:
        raise ValueError("the closeness given scores another model or other images than these")
    scores = {key: closeness.of_plan(plan, derivation) for key, plan in plans.items()}
    best = min(scores, key=lambda k: (scores[k], list(plans).index(k)))
    return best, {"kl": scores, "kept": best, "images": len(images)}


def _weighted_plan(model: nn.Module, allowed: dict[str, LayerCandidates], scores: dict[str, list[float]], objective: str, reduction: float,
                   total: float, fixed: float, targets: list[str], images: Dataset, device: torch.device | str) -> tuple[Plan | None, str]:
    """The allocation weighted by :func:`layer_sensitivity`, or None and why where it cannot be made
    (weights that are not finite and positive, or no plan within the budget with them)."""
    try:
        weights = layer_sensitivity(model, list(allowed), images, device)
    except RuntimeError as e:  # e.g. a model whose output cannot be differentiated, or a softmax that is not finite
        return None, f"layer sensitivity failed: {e}"
    if not all(math.isfinite(w) and w >= 0 for w in weights.values()):
        return None, "layer sensitivities not finite"
    if not any(w > 0 for w in weights.values()):
        return None, "no gradient reached any layer (or every layer's was 0)"
    try:
        return _allocated(scores, allowed, objective, reduction, total, fixed, targets, weights), ""
    except BudgetError as e:
        return None, str(e)


def check_against_allocation(
    model: nn.Module, searched: Plan, allowed: dict[str, LayerCandidates], derivation: Derivation, objective: str,
    reduction: float, total: float, fixed: float, images: Dataset, device: torch.device | str, closeness: Closeness | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """The plan kept (the search's, or one of the allocations' over the options ``allowed``, plain and
    weighted by :func:`layer_sensitivity` on ``images``) and the check's summary.
    Under torchrun rank 0 decides and the others receive its plan. If the allocation cannot meet
    the budget with these options, the search's plan is kept and the summary says why."""
    t0 = time.perf_counter()
    result = None
    if ddp.is_main():
        scores = spectrum_scores(model, allowed, derivation)
        try:
            allocated = _allocated(scores, allowed, objective, reduction, total, fixed, list(searched.layers))
        except BudgetError as e:
            result = (searched.to_dict(), {"kept": "search", "skipped": str(e)})
        else:
            plans = {"search": searched, "spectrum": allocated}
            weighted, why = _weighted_plan(model, allowed, scores, objective, reduction, total, fixed, list(searched.layers), images, device)
            if weighted is not None:
                plans["weighted"] = weighted
            kept, summary = better_plan(model, plans, images, device, derivation, closeness=closeness)
            if why:
                summary["weighted_skipped"] = why
            result = (plans[kept].to_dict(), summary)
    plan, summary = ddp.broadcast_object(result)
    summary["seconds"] = time.perf_counter() - t0
    return Plan.from_dict(plan), summary


__all__ = ["Closeness", "allocate", "better_plan", "check_against_allocation", "layer_sensitivity", "log_probs", "mean_kl", "options",
           "spectrum_scores"]
