"""Synthetic images from a model's BatchNorm statistics (ZeroQ-style, with the SVD-NAS paper's channel mean).

Images start as noise and are optimised so that the mean and standard deviation of every BatchNorm
layer's input, over the batch, match that layer's running statistics; a second term pulls each image's
own per-channel mean and std to 0 and 1. The per-layer term is averaged over channels (the paper's
change to ZeroQ, which sums them) unless ``channel_mean=False``.

Every batch starts from its own seed, so a killed generation resumes to the same images, and under
torchrun each process makes its share of the batches. ``parallel`` batches can be optimised in one
forward and backward pass (a GPU is then kept busy): each keeps its own statistics, its own loss, its
own Adam state and learning-rate schedule, so the images are those of one batch at a time, up to
floating-point rounding.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from svdnas import distributed as ddp
from svdnas.errors import DataError, SpecError
from svdnas.fileio import atomic_write_bytes, atomic_write_json
from svdnas.hooks import forward_hooks, frozen
from svdnas.options import Config, flag_of, option

log = logging.getLogger(__name__)
FORMAT = "svdnas-synthetic/1"
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class SynthConfig(Config):
    """How synthetic images are made (defaults: the paper's ResNet-18 settings).

    Attributes:
        num: images to make.
        batch_size: images optimised together (the statistics are matched per batch).
        iterations: Adam steps per batch.
        lr: Adam's learning rate.
        patience: iterations without improvement before the learning rate is divided by 10.
        image_weight: lambda, the weight of the per-image mean/std term.
        channel_mean: average each layer's term over its channels (the paper) instead of summing (ZeroQ).
        shard_size: images per safetensors file.
        parallel: batches optimised in one pass; changes the speed and memory, not the images (up to
            rounding), so it is not part of what a resumed generation must match.
    """

    num: int = option(1000, flag="--num", help="synthetic images to make")
    batch_size: int = option(32, flag="--synth-batch-size", help="images optimised together")
    iterations: int = option(500, flag="--synth-iterations", help="Adam steps per batch of synthetic images")
    lr: float = option(0.5, flag="--synth-lr", help="Adam's learning rate on the synthetic images")
    patience: int = 100
    image_weight: float = option(1.0, flag="--image-weight", help="lambda, the weight of the per-image mean/std term")
    channel_mean: bool = option(True, flag="--no-channel-mean",
                                help="sum each BatchNorm layer's term over channels (ZeroQ) instead of averaging")
    shard_size: int = 8192
    parallel: int = option(1, flag="--synth-parallel",
                           help="batches optimised in one pass (the same images, faster on a GPU; memory grows with it)")

    def __post_init__(self) -> None:
        for name in ("num", "batch_size", "iterations", "shard_size", "parallel"):
            if getattr(self, name) < 1:
                raise SpecError(f"synthetic {name.replace('_', ' ')} ({flag_of(SynthConfig, name)}) must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SpecError(f"--synth-lr must be positive, got {self.lr}")
        if self.patience < 1 or self.image_weight < 0:
            raise SpecError("synthetic patience must be positive and the image weight (--image-weight) non-negative")


@dataclass
class SyntheticSet:
    """Images and how they were made.

    Attributes:
        images: (N, C, H, W) float32.
        meta: the config, the model, the seed, the loss per iteration of each batch and the time taken.
    """

    images: Tensor
    meta: dict[str, Any]

    def dataset(self, labels: Tensor | None = None) -> torch.utils.data.TensorDataset:
        """As a dataset of (image, label) pairs; labels default to -1 (unknown)."""
        if labels is None:
            labels = torch.full((len(self.images),), -1, dtype=torch.long)
        return torch.utils.data.TensorDataset(self.images, labels)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers with running statistics, by dotted name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


def require_batchnorm(model: nn.Module, spec: str = "the model") -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers, or a :class:`DataError` naming the modes that still work."""
    bns = batchnorm_layers(model)
    if not bns:
        raise DataError(
            f"{spec} has no BatchNorm layer with running statistics, so synthetic images cannot be made from it; "
            "use --mode post-training, few-shot or full with real data"
        )
    return bns


def statistics_loss(model: nn.Module, bns: list[tuple[str, nn.Module]], x: Tensor, config: SynthConfig) -> Tensor:
    """The objective of one batch: BatchNorm statistics matching plus lambda times the image prior."""
    return batch_losses(model, bns, x, config, 1)[0]


def batch_losses(model: nn.Module, bns: list[tuple[str, nn.Module]], x: Tensor, config: SynthConfig, batches: int) -> Tensor:
    """The objective of each of ``batches`` equal batches stacked in ``x``, from one forward pass.

    The model must be in eval mode (its BatchNorm layers use their running statistics), so that one
    image's output does not depend on the others and each loss depends on its own batch alone.
    """
    terms: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        z = inputs[0].unflatten(0, (batches, -1))
        dims = [1, *range(3, z.dim())]
        mean = z.mean(dims)
        std = z.var(dims, unbiased=False).add(module.eps).sqrt()
        target_std = module.running_var.add(module.eps).sqrt()
        term = (mean - module.running_mean).pow(2) + (std - target_std).pow(2)
        terms.append(term.mean(1) if config.channel_mean else term.sum(1))

    with forward_hooks((m, hook) for _, m in bns):
        model(x)
    flat = x.flatten(2)
    prior = (flat.mean(2).pow(2) + (flat.std(2) - 1).pow(2)).sum(1).unflatten(0, (batches, -1)).mean(1)
    return torch.stack(terms).sum(0) + config.image_weight * prior


def generate_batches(
    model: nn.Module,
    input_shape: tuple[int, ...],
    n: int,
    config: SynthConfig,
    seeds: list[int],
    device: torch.device | str = "cpu",
    bns: list[tuple[str, nn.Module]] | None = None,
) -> list[tuple[Tensor, list[float]]]:
    """Optimise one batch of ``n`` images per seed, all in the same passes, each as if alone.

    Each batch has its own leaf tensor, Adam and plateau schedule, driven by its own loss; one
    backward pass of the summed losses gives each batch the gradient of its own (see
    :func:`batch_losses`). Returns (images, loss per iteration) per seed.
    """
    bns = bns if bns is not None else require_batchnorm(model)
    xs = [torch.randn(n, *input_shape, generator=torch.Generator().manual_seed(s)).to(device).requires_grad_(True) for s in seeds]
    opts = [torch.optim.Adam([x], lr=config.lr) for x in xs]
    scheds = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.1, patience=config.patience) for o in opts]
    curves: list[list[float]] = [[] for _ in seeds]
    for it in range(config.iterations):
        losses = batch_losses(model, bns, torch.cat(xs) if len(xs) > 1 else xs[0], config, len(xs))
        values = losses.tolist()
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"the statistics loss became {next(v for v in values if not math.isfinite(v))} after {it} iterations; "
                            "lower the synthetic lr")
        for o in opts:
            o.zero_grad(set_to_none=True)
        losses.sum().backward()
        for o, sched, curve, v in zip(opts, scheds, curves, values):
            o.step()
            sched.step(v)
            curve.append(v)
    return [(x.detach().cpu(), curve) for x, curve in zip(xs, curves)]


def _claim(work: Path, settings: dict[str, Any]) -> None:
    """Make ``work`` the folder of this generation, or check that the batches already there are of it."""

    work.mkdir(parents=True, exist_ok=True)
    marker = work / "settings.json"
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old != settings:
            raise SpecError(f"{work} holds batches of a different generation (other settings or seed); remove it or use --overwrite")
    elif ddp.is_main():
        atomic_write_json(marker, settings)


def _batch_sizes(config: SynthConfig) -> list[int]:
    full, rest = divmod(config.num, config.batch_size)
    return [config.batch_size] * full + ([rest] if rest else [])


def generate(
    model: nn.Module,
    input_shape: tuple[int, ...],
    config: SynthConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    workdir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSet:
    """Make ``config.num`` images from ``model``'s BatchNorm statistics.

    Args:
        input_shape: (C, H, W) of one image.
        workdir: where finished batches are kept (atomically) so that a killed generation resumes;
            without it nothing is written. Under torchrun it must be shared by the processes.
        progress: called with (batches done, batches in all).

    Returns:
        the images, with the loss per iteration of every batch in ``meta["loss"]``.
    """
    from safetensors.torch import load_file, save


    bns = require_batchnorm(model)
    sizes = _batch_sizes(config)
    work = Path(workdir) if workdir is not None else None
    if work is not None:
        made = {k: v for k, v in asdict(config).items() if k != "parallel"}
        _claim(work, {"config": made, "seed": seed, "input_shape": list(input_shape)})
    start = time.perf_counter()
    images: list[Tensor | None] = [None] * len(sizes)
    losses: list[list[float] | None] = [None] * len(sizes)
    with frozen(model):  # only the images are learnt
        done, todo = 0, []
        for i in range(len(sizes)):
            if work is not None and (work / f"batch-{i:05d}.safetensors").is_file():
                log.debug("batch %d already made", i)
                done += 1
            elif i % ddp.world_size() == ddp.rank():
                todo.append(i)
            else:
                done += 1
        if progress is not None and done:
            progress(done, len(sizes))
        while todo:  # runs of batches of one size, at most config.parallel at a time
            run = [todo.pop(0)]
            while todo and len(run) < config.parallel and sizes[todo[0]] == sizes[run[0]]:
                run.append(todo.pop(0))
            made_here = generate_batches(model, input_shape, sizes[run[0]], config, [seed * 1_000_003 + i for i in run], device, bns)
            for i, (x, curve) in zip(run, made_here):
                images[i], losses[i] = x, curve
                if work is not None:
                    atomic_write_bytes(work / f"batch-{i:05d}.safetensors", save({"images": x.contiguous(), "loss": torch.tensor(curve)}))
            done += len(run)
            if progress is not None:
                progress(done, len(sizes))
        ddp.barrier()
        for i in range(len(sizes)):
            if images[i] is None:
                if work is None:
                    raise RuntimeError("generation under torchrun needs a shared workdir")
                saved = load_file(str(work / f"batch-{i:05d}.safetensors"))
                images[i], losses[i] = saved["images"], saved["loss"].tolist()
    seconds = time.perf_counter() - start
    finals = [c[-1] for c in losses if c]  # type: ignore[union-attr]
    log.info("%d synthetic images in %.1fs; final statistics loss %.4f (mean over batches)", config.num, seconds, sum(finals) / len(finals))
    meta = {
        "format": FORMAT, "config": asdict(config), "seed": seed, "input_shape": list(input_shape),
        "batchnorm_layers": len(bns), "seconds": seconds, "loss": losses,
    }
    return SyntheticSet(torch.cat(images), meta)  # type: ignore[arg-type]


def _shard_paths(path: Path, shards: int) -> list[Path]:
    if shards == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1:05d}-of-{shards:05d}{path.suffix}") for i in range(shards)]


def meta_path(path: str | Path) -> Path:
    """The JSON file beside the images: config, loss curves, shard names."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def save_synthetic(path: str | Path, synthetic: SyntheticSet) -> list[Path]:
    """Write the images as float32 safetensors shards (``path`` itself when one shard is enough) and the JSON beside them."""
    from safetensors.torch import save


    path = Path(path)
    if path.suffix != ".safetensors":
        raise SpecError(f"synthetic images are written as .safetensors, got {path}")
    size = synthetic.meta["config"]["shard_size"]
    shards = max(1, math.ceil(len(synthetic.images) / size))
    paths = _shard_paths(path, shards)
    for i, p in enumerate(paths):
        chunk = synthetic.images[i * size : (i + 1) * size].contiguous()
        atomic_write_bytes(p, save({"images": chunk}, metadata={"format": FORMAT, "shard": str(i + 1), "shards": str(shards)}))
    atomic_write_json(meta_path(path), synthetic.meta | {"num": len(synthetic.images), "shards": [p.name for p in paths]})
    return paths


def load_synthetic(path: str | Path) -> SyntheticSet:
    """Read images written by :func:`save_synthetic` (no unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = meta_path(path)
    if not meta_file.is_file():
        raise DataError(f"{path} is not a synthetic image set: {meta_file.name} is missing beside it")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("shards"), list):
        raise DataError(f"{meta_file} does not describe a synthetic image set ({FORMAT})")
    chunks = []
    for name in meta["shards"]:
        shard = path.with_name(Path(str(name)).name)
        try:
            chunks.append(load_file(str(shard))["images"])
        except (OSError, SafetensorError, KeyError) as e:
            raise DataError(f"cannot read synthetic shard {shard}: {e}") from e
    images = torch.cat(chunks)
    if len(images) != meta.get("num"):
        raise DataError(f"{path}: the shards hold {len(images)} images, {meta_file.name} promises {meta.get('num')}")
    return SyntheticSet(images, meta)
