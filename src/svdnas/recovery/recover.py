"""Data-limited recovery of a compressed model: which images each mode learns and validates on, and
the ``finetune`` job (a run directory in, a fine-tuned run directory out).

Modes and their data:

- ``synthetic`` / ``data-free``: synthetic images from the original model's BatchNorm statistics;
  a held-out part of them validates (top-1 agreement with the original), another part measures the
  final fidelity. ``data-free`` also searched on them; recovery is the same.
- ``few-shot``: ``shots`` labelled training images (the same draw as the search images when the
  counts agree), validated on ``val_images`` further training images.
- ``full``: the whole training split less ``val_images`` held out for validation.

The test split is never used to steer anything: it only measures accuracy at the end.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from svdnas import distributed as ddp
from svdnas.data.datasets import DataBundle, search_subset
from svdnas.data.evaluate import batches
from svdnas.errors import DataError, SpecError
from svdnas.lowrank.plan import Plan
from svdnas.recovery.distill import FinetuneConfig, agreement, distill
from svdnas.recovery.synthetic import (
    SynthConfig,
    SyntheticSet,
    generate,
    load_synthetic,
    require_batchnorm,
    save_synthetic,
)

log = logging.getLogger(__name__)
RECOVERY_MODES = ("synthetic", "few-shot", "full", "data-free")
SYNTHETIC_FILE = "synthetic.safetensors"


@dataclass
class SyntheticSplits:
    """Synthetic images, split: ``train`` (learning; data-free searches on it too), ``val`` (the schedule), ``test`` (fidelity)."""

    train: Tensor
    val: Tensor
    test: Tensor
    meta: dict[str, Any]


def split_synthetic(synthetic: SyntheticSet, val: int, test: int) -> SyntheticSplits:
    """Hold out the last ``val + test`` images; at least one image must be left to learn on."""
    n = len(synthetic.images)
    if val < 1 or test < 0 or val + test >= n:
        raise SpecError(f"{n} synthetic images cannot be split into {val} for validation, {test} for fidelity and some to learn on")
    x = synthetic.images
    return SyntheticSplits(x[: n - val - test], x[n - val - test : n - test], x[n - test :], synthetic.meta)


def obtain_synthetic(
    model: nn.Module,
    input_shape: tuple[int, ...],
    config: SynthConfig,
    seed: int,
    device: torch.device | str,
    out: Path | None = None,
    reuse: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSet:
    """Images from ``reuse`` if given, else generated (resumably in ``out``, and saved there)."""
    if reuse is not None:
        synthetic = load_synthetic(reuse)
        if tuple(synthetic.images.shape[1:]) != tuple(input_shape):
            raise DataError(f"{reuse} holds images of shape {tuple(synthetic.images.shape[1:])}, the model takes {tuple(input_shape)}")
        return synthetic
    require_batchnorm(model)
    work = out / "synthetic.partial" if out is not None else None
    synthetic = generate(model, input_shape, config, seed, device, work, progress)

    if out is not None and ddp.is_main():
        save_synthetic(out / SYNTHETIC_FILE, synthetic)
        shutil.rmtree(work, ignore_errors=True)  # type: ignore[arg-type]
    return synthetic


def _images(x: Tensor) -> TensorDataset:
    return TensorDataset(x, torch.full((len(x),), -1, dtype=torch.long))


def recovery_data(
    mode: str, config: FinetuneConfig, data: DataBundle | None, synthetic: SyntheticSplits | None, seed: int,
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(train, val, description) for ``mode``; see the module's docstring."""
    if mode in ("synthetic", "data-free"):
        if synthetic is None:
            raise SpecError(f"--mode {mode} needs synthetic images")
        desc = {"train": f"{len(synthetic.train)} synthetic images", "val": f"{len(synthetic.val)} held-out synthetic images (agreement with the original)"}
        return _images(synthetic.train), _images(synthetic.val), desc
    if data is None:
        raise DataError(f"--mode {mode} needs labelled training data; --data none works only with --mode data-free")
    available = len(data.train)  # type: ignore[arg-type]
    if mode == "few-shot":
        if config.shots + config.val_images > available:
            raise DataError(f"--shots {config.shots} and {config.val_images} validation images exceed the {available} training images")
        train, idx = search_subset(data.train, config.shots, seed)  # the search's draw: the same images when the counts agree
        val, _ = search_subset(data.train, config.val_images, seed + 3, exclude=idx)
        desc = {"train": f"{config.shots} labelled training images", "val": f"{config.val_images} further training images"}
        return train, val, desc
    if config.val_images >= available:
        raise DataError(f"{config.val_images} validation images leave nothing of the {available} training images to learn on")
    val, idx = search_subset(data.train, config.val_images, seed + 3)
    mask = torch.ones(available, dtype=torch.bool)
    mask[idx] = False
    train = Subset(data.train, mask.nonzero().flatten().tolist())
    desc = {"train": f"{len(train)} training images (the split less validation)", "val": f"{config.val_images} held-out training images"}
    return train, val, desc


def recover(
    original: nn.Module,
    compressed: nn.Module,
    plan: Plan,
    mode: str,
    config: FinetuneConfig,
    data: DataBundle | None,
    synthetic: SyntheticSplits | None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    checkpoint: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``compressed`` in place by distillation from ``original``; returns the report's ``recovery`` block."""
    if mode not in RECOVERY_MODES:
        raise SpecError(f"recovery mode must be one of {', '.join(RECOVERY_MODES)}, got {mode!r}")
    # the run's mode decides the loss; settings left unset take that mode's defaults
    config = config.resolved("synthetic" if mode == "data-free" else mode)
    train, val, desc = recovery_data(mode, config, data, synthetic, seed)
    layers = [n for n, specs in plan.layers.items() if specs]
    t0 = time.perf_counter()
    history = distill(compressed, original, layers, train, val, config, device, seed, checkpoint, progress)
    return {
        "mode": mode, "loss": config.mode, "config": asdict(config), "data": desc, "layers": len(layers),
        "history": history.to_dict(), "seconds": time.perf_counter() - t0,
    }


def fidelity(compressed: nn.Module, original: nn.Module, images: Tensor, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Top-1 agreement of the two models on held-out synthetic images."""
    return {"top1_agreement": agreement(compressed, original, _images(images), device), "images": len(images), "split": "held-out synthetic images"}


def synthetic_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The statistics-matching loss per iteration, averaged over batches, and what made it."""
    curves = [c for c in meta.get("loss", []) if c]
    length = min((len(c) for c in curves), default=0)
    mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
    return {
        "config": meta.get("config"), "seconds": meta.get("seconds"),
        "batchnorm_layers": meta.get("batchnorm_layers"), "loss_per_iteration": mean_curve,
    }


@torch.no_grad()
def soft_labels(model: nn.Module, images: Tensor, device: torch.device | str = "cpu") -> TensorDataset:
    """``images`` with ``model``'s softmax as (probability) targets: the data-free search's labels."""
    probs = [torch.softmax(model(x.to(device)), 1).cpu() for x, _ in batches(_images(images), 256)]
    return TensorDataset(images, torch.cat(probs))


