"""The images a compress job searches and prunes on: a fixed labelled subset of the training split, or
(data-free) synthetic images labelled by the original model; the proxy's images always apart."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from svdnas.data.datasets import DataBundle, search_subset
from svdnas.data.evaluate import batches
from svdnas.errors import SpecError
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.recover import SyntheticSplits, obtain_synthetic, soft_labels, split_synthetic
from svdnas.recovery.synthetic import SynthConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def soft_labelled(model: nn.Module, subset, device) -> torch.utils.data.TensorDataset:
    """The search images with the original model's softmax as (probability) targets."""
    xs, ps = [], []
    for x, _ in batches(subset, 256):
        xs.append(x)
        ps.append(torch.softmax(model(x.to(device)), 1).cpu())
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ps))


def real_search_images(data: DataBundle, config: CompressConfig, seed: int):
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


def synthetic_splits(
    model: nn.Module, shape: tuple[int, ...], config: CompressConfig, seed: int, device, out: Path | None, progress, seconds: dict[str, float],
) -> SyntheticSplits:
    """The run's synthetic images (made, resumably in ``out``, or reused), split for learning, validation and fidelity."""
    t0 = time.perf_counter()
    synth = config.synth or SynthConfig()
    synthetic = obtain_synthetic(
        model, shape, synth, seed, device, out, config.synthetic_path,
        (lambda d, t: progress("synthetic", d, t)) if progress is not None else None,
    )
    seconds["synthetic"] = time.perf_counter() - t0
    return split_synthetic(synthetic, config.synth_val, config.synth_test)


@torch.no_grad()
def _predictions(model: nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)])


def synthetic_search_images(model, splits: SyntheticSplits, config: CompressConfig, device):
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
