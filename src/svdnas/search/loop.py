"""Learning the logits of the super blocks: the paper's loss, or a budget the search steers to."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from svdnas import distributed as ddp
from svdnas.data.evaluate import batches
from svdnas.errors import NonFiniteError, SpecError
from svdnas.fileio import write_checkpoint
from svdnas.hooks import forward_hooks
from svdnas.options import Config, flag_of, option
from svdnas.search.supernet import WINDOW_DTYPE_NAMES, MixedLayer

log = logging.getLogger(__name__)

SAMPLINGS = ("mixed", "two")


@dataclass
class SearchConfig(Config):
    """Settings of one search.

    Attributes:
        epochs: passes over the search images, at most (the temperature reaches its final value after
            the last). 5: with the output-aware default derivation, plans after 1 to 5 epochs lost no more
            top-1 than after 20 (benchmarks/diagnostics/search_epochs.py, benchmarks/RESULTS.md).
        batch_size: images per step.
        lr, betas, weight_decay: Adam on the logits (the paper: 0.01, (0.9, 0.999), 5e-4 over 100
            epochs; our default 0.1 suits the 5x shorter schedule, measured in benchmarks/RESULTS.md).
        temperature: initial Gumbel-softmax temperature (paper: 5).
        final_temperature: temperature after the last epoch; the per-epoch factor follows from it
            (the paper's 0.965 per epoch over 100 epochs ends at 0.14).
        sampling: ``mixed`` (default, every candidate in one weight) or ``two`` (the release's).
        window_dtype: precision of the ``mixed`` super blocks' rank-window products: ``auto``
            (bfloat16 where the device multiplies it natively, else float32), ``float32``, ``bfloat16``.
        beta: the paper's loss ``CE * (log F / log F0) ** beta`` when set; else the budget mode.
        target: cost ratio F / F0 to steer to in budget mode (1 - reduction).
        penalty_lr: step of the dual ascent on the budget multiplier.
        patience: stop once the plan the logits select has stayed the same for this many epochs
            and the budget multiplier has settled (0: always run every epoch).
        settle: the multiplier has settled when it moved by at most this share of its value over
            those epochs.
    """

    epochs: int = option(5, flag="--epochs", help="passes of the search over the search images (at most: see --patience)")
    batch_size: int = option(128, flag="--batch-size", help="search images per step")
    lr: float = option(0.1, flag="--lr", help="Adam learning rate of the logits (the paper: 0.01 over 100 epochs)")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    temperature: float = 5.0
    final_temperature: float = 5.0 * 0.965**100
    sampling: str = option("mixed", flag="--sampling", choices=SAMPLINGS,
                           help="mixed: all candidates in one weight (default); two: the release's scheme")
    window_dtype: str = option("auto", flag="--search-dtype", choices=WINDOW_DTYPE_NAMES,
                               help="precision of the mixed super blocks' rank-window products "
                                    "(auto, the default: bfloat16 where the device multiplies it natively)")
    beta: float | None = None
    target: float | None = None
    penalty_lr: float = 0.5
    patience: int = option(2, flag="--patience",
                           help="stop once the selected plan has not changed for this many epochs and the budget multiplier "
                                "has settled (0: run every epoch)")
    settle: float = 0.2

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(f"{flag_of(SearchConfig, name)} must be positive, got {getattr(self, name)}")
        if self.patience < 0:
            raise SpecError(f"--patience must be 0 (off) or positive, got {self.patience}")
        if (self.beta is None) == (self.target is None):
            raise SpecError("give exactly one of beta (the paper's loss) and a target cost ratio")
        if self.target is not None and not 0 < self.target < 1:
            raise SpecError(f"target cost ratio must be in (0, 1), got {self.target}")
        if self.sampling not in SAMPLINGS:
            raise SpecError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.window_dtype not in WINDOW_DTYPE_NAMES:
            raise SpecError(f"--search-dtype: the search dtype must be {', '.join(WINDOW_DTYPE_NAMES[:-1])} or {WINDOW_DTYPE_NAMES[-1]}, got {self.window_dtype!r}")

    @property
    def decay(self) -> float:
        return (self.final_temperature / self.temperature) ** (1.0 / self.epochs)


@dataclass
class SearchHistory:
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    expected_cost_ratio: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    multiplier: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    # per layer after the search: the final logits (index 0 the original layer, then the candidates
    # in order) and the index the budget selection picked
    logits: dict[str, list[float]] = field(default_factory=dict)
    choice: dict[str, int] = field(default_factory=dict)
    # per epoch, the candidate each layer's logits select at the end of it (when the search was given
    # a selection), and why the search ended: "epochs", or "stable" when the stopping rule ended it
    selection: list[list[int]] = field(default_factory=list)
    stopped: str = "epochs"

    def to_dict(self) -> dict:
        return asdict(self)


def expected_cost(layers: dict[str, MixedLayer], costs: dict[str, torch.Tensor], fixed: float) -> torch.Tensor:
    total = torch.tensor(fixed, device=next(iter(costs.values())).device)
    for name, layer in layers.items():
        total = total + (layer.last_weights * costs[name]).sum()
    return total


def settled(history: SearchHistory, patience: int, tolerance: float) -> bool:
    """Whether the last ``patience`` epochs left the selected plan as it was and moved the budget
    multiplier by at most ``tolerance`` of its value (the search has decided)."""
    if patience < 1 or len(history.selection) <= patience:
        return False
    recent = history.selection[-patience - 1 :]
    if any(s != recent[0] for s in recent[1:]):
        return False
    m = history.multiplier[-patience - 1 :]
    return max(m) - min(m) <= tolerance * max(abs(m[-1]), 1e-12) or max(m) == 0.0


def search(
    model: nn.Module,
    layers: dict[str, MixedLayer],
    data: Dataset,
    config: SearchConfig,
    costs: dict[str, list[float]],
    total_cost: float,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    fixed: float | None = None,
    checkpoint: Path | None = None,
    select: Callable[[], Sequence[int]] | None = None,
) -> SearchHistory:
    """Learn the logits of ``layers`` (already swapped into ``model``) on ``data``.

    Args:
        costs: per layer, the cost of each candidate (original first) on the objective.
        total_cost: the original model's whole cost on the objective (F0).
        on_step: called with (step, epoch) after every step, for progress bars.
        fixed: cost of everything outside ``layers`` (default: F0 minus the layers' original costs).
        checkpoint: file written atomically after every epoch; if it exists when the search
            starts, the search resumes from it and ends as an uninterrupted one would.
        select: the plan the current logits select (one index per layer), called after every
            epoch; with ``config.patience`` the search stops once it has settled (see :func:`settled`).
    """
    model.eval()  # BatchNorm statistics stay those of the pre-trained model
    for p in model.parameters():
        p.requires_grad_(False)
    thetas = [layer.theta for layer in layers.values()]
    for t in thetas:
        t.requires_grad_(True)
    opt = torch.optim.Adam(thetas, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    cost_t = {n: torch.tensor(c, device=device) / total_cost for n, c in costs.items()}
    if fixed is None:
        fixed = total_cost - sum(c[0] for c in costs.values())
    fixed = fixed / total_cost
    generator = torch.Generator().manual_seed(seed)  # the order of the search images
    noise = torch.Generator(device=torch.device(device)).manual_seed(seed + 1)  # the super blocks' Gumbel noise and samples
    for layer in layers.values():
        layer.generator = noise
    history = SearchHistory()
    multiplier = 0.0
    temperature = config.temperature
    first_epoch = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["names"] != list(layers) or state["epochs"] != config.epochs:
            raise SpecError(f"{checkpoint} belongs to a different search; remove it or use --overwrite")
        with torch.no_grad():
            for t, saved in zip(thetas, state["thetas"]):
                t.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        multiplier, temperature, first_epoch = state["multiplier"], state["temperature"], state["epoch"]
        history = SearchHistory(**state["history"])
        generator.set_state(state["generator"])
        if "noise" in state:  # checkpoints of earlier versions drew the noise from the global generator
            noise.set_state(state["noise"])
        log.info("resuming the search at epoch %d from %s", first_epoch + 1, checkpoint)
        if history.stopped != "epochs":  # it had decided before it was killed
            return history
    start = time.perf_counter() - (history.seconds[-1] if history.seconds else 0.0)
    for epoch in range(first_epoch, config.epochs):
        for layer in layers.values():
            layer.temperature = temperature
        sums = {"loss": 0.0, "ce": 0.0, "cost": 0.0, "n": 0}
        for step, (x, y) in enumerate(batches(data, config.batch_size, shuffle=True, generator=generator)):
            if ddp.active():  # every process sees the same global batch and takes its share
                x, y = x[ddp.rank() :: ddp.world_size()], y[ddp.rank() :: ddp.world_size()]
            x, y = x.to(device), y.to(device)
            before = [t.detach().clone() for t in thetas] if config.sampling == "two" else None
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            ratio = expected_cost(layers, cost_t, fixed)
            if config.beta is not None:
                loss = ce * (torch.log(ratio * total_cost) / math.log(total_cost)) ** config.beta
            else:
                loss = ce + multiplier * (ratio - config.target)
            # averaged before the step, so that every process sees a NaN any of them met and all stop together
            stats = torch.tensor([ratio.item(), loss.item(), ce.item()], device=ce.device)  # nccl reduces only GPU tensors
            ddp.average_([stats])
            if not torch.isfinite(stats).all():
                ratio_, loss_, ce_ = stats.tolist()
                raise _non_finite(f"the search loss is not finite (loss {loss_:.4g}, cross-entropy {ce_:.4g}, cost ratio {ratio_:.4g}) "
                                  f"at epoch {epoch + 1}, step {step + 1}{_first_non_finite(model, x, logits)}", checkpoint, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ddp.average_([t.grad for t in thetas])
            opt.step()
            if before is not None:
                for layer, b in zip(layers.values(), before):
                    layer.rescale_sampled(b)
            for name, t in zip(layers, thetas):
                if not torch.isfinite(t).all():
                    raise _non_finite(f"the logits of layer {name} are not finite after epoch {epoch + 1}, step {step + 1} "
                                      "(a lower --lr may help)", checkpoint, epoch)
            if config.target is not None:
                multiplier = max(0.0, multiplier + config.penalty_lr * (stats[0].item() - config.target))
            sums["cost"] += stats[0].item()
            sums["loss"] += stats[1].item()
            sums["ce"] += stats[2].item()
            sums["n"] += 1
            if on_step is not None:
                on_step(step, epoch)
        n = max(sums["n"], 1)
        history.epoch.append(epoch + 1)
        history.loss.append(sums["loss"] / n)
        history.ce.append(sums["ce"] / n)
        history.expected_cost_ratio.append(sums["cost"] / n)
        history.temperature.append(temperature)
        history.multiplier.append(multiplier)
        history.seconds.append(time.perf_counter() - start)
        log.info(
            "epoch %d: loss %.4f ce %.4f expected cost %.3f of original, T %.3f, multiplier %.3f",
            epoch + 1, history.loss[-1], history.ce[-1], history.expected_cost_ratio[-1], temperature, multiplier,
        )
        temperature *= config.decay
        if select is not None:
            history.selection.append([int(c) for c in select()])
            if settled(history, config.patience, config.settle) and epoch + 1 < config.epochs:
                history.stopped = "stable"
                log.info("the search stopped after epoch %d of %d: the selected plan has not changed for %d epochs and the "
                         "budget multiplier has settled", epoch + 1, config.epochs, config.patience)
        if checkpoint is not None and ddp.is_main():
            write_checkpoint(checkpoint, {
                "names": list(layers), "epochs": config.epochs, "epoch": epoch + 1,
                "thetas": [t.detach().cpu() for t in thetas], "optimizer": opt.state_dict(),
                "multiplier": multiplier, "temperature": temperature, "history": history.to_dict(),
                "generator": generator.get_state(), "noise": noise.get_state(),
            })
        if history.stopped != "epochs":
            break
    return history


def _non_finite(what: str, checkpoint: Path | None, epoch: int) -> NonFiniteError:
    """The error that stops a search at a NaN or inf; says which checkpoint is kept."""
    kept = ""
    if checkpoint is not None:
        done = checkpoint.is_file() and epoch > 0
        kept = f"; the checkpoint of epoch {epoch} is kept in {checkpoint}" if done else "; no epoch had finished, so there is no checkpoint"
    return NonFiniteError(f"{what}: stopping the search{kept}")


@torch.no_grad()
def _first_non_finite(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> str:
    """Where a non-finite loss came from: the first module (in call order) whose output is not
    finite when the batch is run again, or the model's logits; empty if it does not show again."""
    if torch.isfinite(logits).all():
        return ""
    found: list[str] = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output) -> None:
            if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                found.append(name)
        return fn

    with forward_hooks((m, hook(n)) for n, m in model.named_modules() if n):  # a module's hook runs after its children's
        model(x)
    return f" (the logits are not finite; first at the output of {found[0]})" if found else " (the logits are not finite)"
