"""Knowledge distillation from the original model (teacher) into the compressed one (student).

Layers are paired by dotted name: a compressed layer's output is compared with the original layer's
output at the same name. The three losses of the paper:

- ``synthetic``: the sum over compressed layers of the MSE between their outputs;
- ``few-shot``: that MSE + alpha * T^2 * KL(student || teacher at temperature T) + (1 - alpha) * CE;
- ``full``: CE on the labels only.

By default (``layer_loss="relative"``) each layer's MSE is divided by the mean square of the
teacher's output of that layer on the same batch, so that the term does not depend on the scale of
a model's activations: the paper's plain MSE (``"plain"``) sums to about 1.6 over the 15 layers of
``zoo:resnet18`` at 60% but to about 70 over the 19 layers of ``zoo:mobilenetv2`` at 30%, whose
pointwise projections output mean squares up to 36, and at the paper's learning rate that
destroyed the MobileNetV2 in the first epoch (benchmarks/RESULTS.md).

With ``augment`` (off by default), real training batches (``few-shot``, ``full``) are flipped
left-right at random and shifted by up to 1/14 of the image side (edges replicated), the teacher
and the student seeing the same images. Measured on ``zoo:resnet18`` at 60% few-shot it did not
help (benchmarks/RESULTS.md), so the paper's plain images stay the default.

SGD with momentum; the learning rate is divided by ``factor`` when the validation score has not
improved for ``patience`` epochs and training stops when it falls below ``min_lr`` (or after
``epochs``). The best state on the validation set is the one returned.

A learning rate too high for a model does not end the run: when an epoch ends more than
``collapse`` points of the validation score below the best so far, or its loss is not finite, the
student goes back to its best state and starts again with the learning rate times ``factor``
(momentum and schedule reset). At ten times the paper's rate a ResNet-18 recovers better and a
MobileNetV2 collapses in its first epoch (benchmarks/RESULTS.md); with this rule the second goes on
at the paper's rate instead of keeping its starting point.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from svdnas import distributed as ddp
from svdnas.data.evaluate import batches
from svdnas.errors import NonFiniteError, SpecError
from svdnas.fileio import write_checkpoint
from svdnas.hooks import evaluation_mode, frozen
from svdnas.options import Config, flag_of, option

log = logging.getLogger(__name__)
MODES = ("synthetic", "few-shot", "full")
# Epoch caps when none is given: the plateau schedule usually stops first on the small sets.
DEFAULT_EPOCHS = {"synthetic": 60, "few-shot": 60, "full": 3}
# Learning rates when none is given: ten times the paper's 0.001 for distillation, where it recovered
# more on every model measured once a collapse restarts at a tenth (benchmarks/RESULTS.md); the
# paper's for plain fine-tuning on the whole training split, not measured at another rate.
DEFAULT_LR = {"synthetic": 1e-2, "few-shot": 1e-2, "full": 1e-3}
LAYER_LOSSES = ("relative", "plain")


@dataclass
class FinetuneConfig(Config):
    """Distillation settings (defaults: the paper's, but for the learning rate and the relative layer term).

    Attributes:
        mode: ``synthetic``, ``few-shot`` or ``full``.
        epochs: most epochs (None: 60 for synthetic and few-shot, 3 for full).
        batch_size: images per step (over all processes under torchrun).
        lr: SGD's learning rate (None: 0.01 for synthetic and few-shot, 0.001 for full).
        momentum, weight_decay: SGD.
        patience: epochs without a better validation score before the learning rate drops.
        factor: what the learning rate is multiplied by then.
        min_lr: training stops once the learning rate is below it.
        temperature: T of the KL term (few-shot).
        alpha: weight of the KL term against CE (few-shot).
        shots: labelled training images for few-shot.
        val_images: images held out of the training data (or of the synthetic set) for the schedule.
        update_bn: let BatchNorm layers update their running statistics (None: only with ``full``;
            on synthetic or few images they would drift away from the real data's).
        augment: flip and shift the real training batches (``few-shot``, ``full``; synthetic
            images never are).
        layer_loss: ``relative`` (each layer's MSE over the teacher output's mean square) or
            ``plain`` (the paper's MSE).
        collapse: validation points below the best score so far at which an epoch counts as a
            collapse and the run restarts from the best state with the learning rate times
            ``factor``; a non-finite loss does the same. 0 turns both off (a non-finite loss then
            stops the run).
    """

    mode: str = "few-shot"
    epochs: int | None = option(None, flag="--finetune-epochs", help="most epochs of fine-tuning (default: 60, or 3 with --mode full)")
    batch_size: int = option(64, flag="--finetune-batch-size", help="images per fine-tuning step")
    lr: float | None = option(None, flag="--finetune-lr",
                              help="SGD's learning rate (default: 0.01 for synthetic, few-shot and data-free, restarting at a tenth "
                                   "after a collapse; 0.001, the paper's, for full)")
    momentum: float = 0.9
    weight_decay: float = 1e-4
    patience: int = 10
    factor: float = 0.1
    min_lr: float = 1e-4
    temperature: float = 6.0
    alpha: float = 0.95
    shots: int = option(1000, flag="--shots", help="few-shot: labelled training images to learn on")
    val_images: int = option(1000, flag="--val-images", help="training images held out to steer the fine-tuning schedule")
    update_bn: bool | None = None
    augment: bool = option(False, flag="--augment",
                           help="few-shot and full: flip and shift the training images at random (teacher and student alike)")
    layer_loss: str = option("relative", flag="--layer-loss", choices=LAYER_LOSSES,
                             help="per-layer distillation term: MSE over the original output's mean square (relative, the default), "
                                  "or the paper's plain MSE")
    collapse: float = option(10.0, flag="--collapse",
                             help="validation points below the best at which fine-tuning goes back to its best state with a tenth "
                                  "of the learning rate (a non-finite loss too); 0: off, a non-finite loss stops the run")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"fine-tuning mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.layer_loss not in LAYER_LOSSES:
            raise SpecError(f"--layer-loss: the layer loss must be one of {', '.join(LAYER_LOSSES)}, got {self.layer_loss!r}")
        for name in ("epochs", "batch_size", "shots", "val_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SpecError(f"{flag_of(FinetuneConfig, name)} must be positive, got {getattr(self, name)}")
        if self.patience < 0:
            raise SpecError(f"fine-tuning patience must be non-negative, got {self.patience}")
        if self.lr is not None and self.lr <= 0:
            raise SpecError(f"--finetune-lr must be positive, got {self.lr}")
        if not 0 < self.factor < 1 or self.min_lr <= 0:
            raise SpecError("fine-tuning needs min_lr > 0 and 0 < factor < 1")
        if not 0 <= self.alpha <= 1 or self.temperature <= 0:
            raise SpecError("fine-tuning needs 0 <= alpha <= 1 and temperature > 0")
        if self.collapse < 0:
            raise SpecError(f"--collapse must be non-negative, got {self.collapse}")

    def resolved(self, mode: str | None = None) -> FinetuneConfig:
        """A copy for ``mode`` (default: this config's) with the settings left unset filled in for that mode.

        Epochs, learning rate and whether BatchNorm updates depend on the mode; they are resolved
        here rather than when the config is made, so that a config made for one mode and run in
        another gets the other mode's defaults.
        """
        mode = mode or self.mode
        return replace(
            self, mode=mode, epochs=self.epochs if self.epochs is not None else DEFAULT_EPOCHS[mode],
            lr=self.lr if self.lr is not None else DEFAULT_LR[mode],
            update_bn=self.update_bn if self.update_bn is not None else mode == "full",
        )


@dataclass
class FinetuneHistory:
    """Per epoch: mean training loss, validation score, learning rate, seconds since the start; and
    each restart at a lower learning rate (epoch, why, rate before and after)."""

    epoch: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metric: str = "top1"
    best_epoch: int = 0
    stopped: str = ""
    restarts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Outputs:
    """Forward hooks that keep the outputs of the named layers of a model."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.out: dict[str, Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_m: nn.Module, _i: tuple, out: Tensor) -> None:
            self.out[name] = out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 256) -> float:
    """Percentage of images on which the two models' top-1 predictions agree (fidelity), both in eval mode
    (each module's mode put back after)."""
    same = total = 0
    with evaluation_mode(student), evaluation_mode(teacher):
        for x, _ in batches(dataset, batch_size):
            x = x.to(device)
            same += (student(x).argmax(1) == teacher(x).argmax(1)).sum().item()
            total += len(x)
    return 100.0 * same / max(total, 1)


@torch.no_grad()
def _top1(model: nn.Module, dataset: Dataset, device: torch.device | str, batch_size: int = 256) -> float:
    hit = total = 0
    for x, y in batches(dataset, batch_size):
        hit += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * hit / max(total, 1)


def _train_mode(model: nn.Module, update_bn: bool) -> None:
    model.train()
    if not update_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x`` (N, C, H, W), each image mirrored left-right with probability 1/2 and shifted by up to
    ``max(1, round(side / 14))`` pixels each way, the edges replicated."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    pad_h, pad_w = max(1, round(h / 14)), max(1, round(w / 14))
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad_w + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def layer_mse(student: Tensor, teacher: Tensor, kind: str = "relative") -> Tensor:
    """MSE between a layer's outputs; ``relative`` divides it by the teacher output's mean square."""
    mse = F.mse_loss(student, teacher)
    if kind == "plain":
        return mse
    return mse / teacher.detach().pow(2).mean().clamp_min(1e-12)


def distill_loss(
    mode: str, s_logits: Tensor, t_logits: Tensor, s_out: dict[str, Tensor], t_out: dict[str, Tensor], y: Tensor, config: FinetuneConfig,
) -> Tensor:
    """The loss for ``mode``: the paper's, with its layer term as ``config.layer_loss`` says (see the module's docstring)."""
    if mode == "full":
        return F.cross_entropy(s_logits, y)
    mse = torch.stack([layer_mse(s_out[n], t_out[n], config.layer_loss) for n in s_out]).sum() if s_out else s_logits.new_zeros(())
    if mode == "synthetic":
        return mse
    t = config.temperature
    kl = F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1), reduction="batchmean", log_target=True)
    return mse + config.alpha * t * t * kl + (1 - config.alpha) * F.cross_entropy(s_logits, y)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[str],
    train: Dataset,
    val: Dataset,
    config: FinetuneConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
    checkpoint: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FinetuneHistory:
    """Fine-tune ``student`` in place by distillation from ``teacher``.

    Args:
        layers: dotted names of the compressed layers, paired between the two models.
        train: (image, label) pairs; labels are ignored in ``synthetic`` mode.
        val: held-out images for the schedule: top-1 on their labels, or in ``synthetic`` mode the
            top-1 agreement with the teacher.
        checkpoint: file written atomically after every epoch; a run that finds it resumes from it.
        progress: called with (steps done, steps in all) for a progress bar.

    The teacher runs in eval mode with its parameters frozen; both are put back as they were on return.

    Raises:
        NonFiniteError: the loss became NaN or infinite (the last epoch's checkpoint is kept).
    """
    with frozen(teacher):
        return _fine_tune(student, teacher, layers, train, val, config.resolved(), device, seed, checkpoint, progress)


def _fine_tune(student: nn.Module, teacher: nn.Module, layers: list[str], train: Dataset, val: Dataset, config: FinetuneConfig,
               device: torch.device | str, seed: int, checkpoint: Path | None, progress: Callable[[int, int], None] | None) -> FinetuneHistory:
    """:func:`distill`'s work, the teacher already frozen."""
    mode = config.mode
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)

    def fresh(lr: float):
        o = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
        return o, torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", factor=config.factor, patience=config.patience)

    def spent(lr: float) -> bool:  # the schedule ends below min_lr
        return lr < config.min_lr * (1 - 1e-6)

    opt, sched = fresh(config.lr)
    generator = torch.Generator().manual_seed(seed)
    history = FinetuneHistory(metric="agreement" if mode == "synthetic" else "top1")
    best_score, best_state = -math.inf, None
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        # checkpoints from before the relative layer term have no "layer_loss": theirs was plain
        if state["mode"] != mode or state["layers"] != layers or state.get("layer_loss", "plain") != config.layer_loss:
            raise SpecError(f"{checkpoint} belongs to a different fine-tuning run; remove it or use --overwrite")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        history = FinetuneHistory(**state["history"])
        best_score, best_state, first = state["best_score"], state["best"], state["epoch"]
        log.info("resuming fine-tuning at epoch %d from %s", first + 1, checkpoint)
    score_fn = (lambda: agreement(student, teacher, val, device)) if mode == "synthetic" else (lambda: _top1(student, val, device))
    if best_state is None:  # the starting point competes too: recovery never ends worse on validation
        student.eval()
        best_score, best_state = score_fn(), _copy_state(student)
        log.info("fine-tuning (%s): validation %s %.2f before", mode, history.metric, best_score)
    steps_per_epoch = -(-len(train) // config.batch_size)  # type: ignore[arg-type]
    t_out = _Outputs(teacher, layers) if mode != "full" else None
    s_out = _Outputs(student, layers) if mode != "full" else None
    start = time.perf_counter() - (history.seconds[-1] if history.seconds else 0.0)
    try:
        for epoch in range(first, config.epochs):  # type: ignore[arg-type]
            if spent(opt.param_groups[0]["lr"]):
                history.stopped = f"learning rate below {config.min_lr}"
                break
            _train_mode(student, bool(config.update_bn))
            total, n = 0.0, 0
            for step, (x, y) in enumerate(batches(train, config.batch_size, shuffle=True, generator=generator)):
                if config.augment and mode != "synthetic" and x.dim() == 4:  # the whole batch, so that every process draws alike
                    x = augment(x, generator)
                if ddp.active():
                    x, y = x[ddp.rank() :: ddp.world_size()], y[ddp.rank() :: ddp.world_size()]
                x, y = x.to(device), y.to(device)
                with torch.no_grad():
                    t_logits = teacher(x) if mode != "full" else None
                s_logits = student(x)
                loss = distill_loss(mode, s_logits, t_logits, s_out.out if s_out else {}, t_out.out if t_out else {}, y, config)  # type: ignore[arg-type]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                stat = loss.detach().reshape(1).clone()
                ddp.average_([p.grad for p in params] + [stat])  # the loss too: every process logs the whole batch's
                if not torch.isfinite(stat).all():  # checked after averaging, so that every process stops together
                    if config.collapse == 0 or spent(opt.param_groups[0]["lr"] * config.factor):
                        raise NonFiniteError(
                            f"the fine-tuning loss became {stat.item()} at epoch {epoch + 1}, step {step + 1}; "
                            f"lower --finetune-lr (the last checkpoint is kept)"
                        )
                    diverged = f"loss {stat.item()} at step {step + 1}"
                    break
                opt.step()
                total += stat.item()
                n += 1
                if progress is not None:
                    progress(epoch * steps_per_epoch + step + 1, config.epochs * steps_per_epoch)  # type: ignore[operator]
            else:
                diverged = ""
            lr = opt.param_groups[0]["lr"]
            student.eval()
            score = score_fn()
            if not diverged and config.collapse > 0 and score < best_score - config.collapse and not spent(lr * config.factor):
                diverged = f"validation {history.metric} {score:.2f}, best {best_score:.2f}"
            if diverged:  # back to the best state, at a lower rate
                student.load_state_dict(best_state)
                opt, sched = fresh(lr * config.factor)
                history.restarts.append({"epoch": epoch + 1, "why": diverged, "lr": lr, "new_lr": lr * config.factor})
                log.warning("fine-tuning epoch %d collapsed (%s): back to the best state with lr %.1e", epoch + 1, diverged, lr * config.factor)
            else:
                sched.step(score)
            if not diverged and score > best_score:  # a diverged epoch's score is of the broken weights
                best_score, best_state = score, _copy_state(student)
                history.best_epoch = epoch + 1
            history.epoch.append(epoch + 1)
            history.loss.append(total / n if n else None)  # type: ignore[arg-type]  # None: the first step diverged
            history.val.append(score)
            history.lr.append(lr)
            history.seconds.append(time.perf_counter() - start)
            log.info("fine-tuning epoch %d: loss %s, validation %s %.2f, lr %.1e",
                     epoch + 1, f"{total / n:.5f}" if n else "-", history.metric, score, lr)
            if checkpoint is not None and ddp.is_main():
                write_checkpoint(checkpoint, {
                    "mode": mode, "layers": layers, "layer_loss": config.layer_loss, "epoch": epoch + 1, "student": _copy_state(student),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": generator.get_state(),
                    "rng": torch.get_rng_state(), "history": history.to_dict(), "best_score": best_score, "best": best_state,
                })
        else:
            history.stopped = history.stopped or f"{config.epochs} epochs"
    finally:
        for hooks in (t_out, s_out):
            if hooks is not None:
                hooks.remove()
    student.load_state_dict(best_state)
    student.eval()
    return history


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
