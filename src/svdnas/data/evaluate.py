"""Top-1 / top-5 accuracy of a model on a dataset."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from svdnas.fileio import atomic_write_json, cache_root
from svdnas.hooks import evaluation_mode

log = logging.getLogger(__name__)


def batches(dataset: Dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches; tensor datasets (and subsets of them) are sliced without a DataLoader."""
    base, idx = dataset, None
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        base, idx = dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(base, TensorDataset):
        x, y = base.tensors[0], base.tensors[1]
        n = len(idx) if idx is not None else len(x)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if idx is not None:
            order = idx[order]
        for i in range(0, n, batch_size):
            sel = order[i : i + batch_size]
            yield x[sel], y[sel]
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
    yield from loader


def _channels_last(model: nn.Module, device: torch.device | str) -> nn.Module | None:
    """A copy of ``model`` in channels-last memory on a CPU (its convolutions run about twice as fast
    there at the same results); None elsewhere, or where the model cannot be copied."""
    if torch.device(device).type != "cpu":
        return None
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except Exception as e:  # noqa: BLE001 - a model that cannot be copied is evaluated as it is
        log.debug("evaluating in the model's own memory format: %s", e)
        return None


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent over the whole ``dataset`` (on a CPU, of a channels-last
    copy of ``model``; ``model`` itself is left as it was)."""
    fast = _channels_last(model, device)
    runner = fast if fast is not None else model
    correct1 = correct5 = total = 0
    with evaluation_mode(runner):
        for x, y in batches(dataset, batch_size):
            x, y = x.to(device), y.to(device)
            if fast is not None and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = runner(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            total += len(y)
            if progress is not None:
                progress(len(y))
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def fingerprint(model: nn.Module, dataset: Dataset, device: torch.device | str) -> str:
    """What an evaluation's result depends on, hashed: the model's class, structure and every
    parameter and buffer, the images and labels of ``dataset``, the device type and torch's version."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n{torch.__version__}\n{torch.device(device).type}\n".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for x, y in batches(dataset, 2048):
        h.update(x.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        h.update(y.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate_cached(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    cache: Path | None = None,
) -> tuple[dict[str, float], bool]:
    """:func:`evaluate`, remembered: a model already evaluated on the same images (same weights, same
    structure, same device type and torch version) is not run again. ``SVDNAS_EVAL_CACHE=0`` disables it.

    Returns:
        (accuracies, whether they came from the cache). The cache is
        ``$SVDNAS_CACHE/evaluations.json`` unless ``cache`` names another file.
    """
    if os.environ.get("SVDNAS_EVAL_CACHE") == "0":
        return evaluate(model, dataset, device, progress=progress), False
    path = cache or cache_root() / "evaluations.json"
    key = fingerprint(model, dataset, device)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict) and {"top1", "top5"} <= set(known[key]):
        return {"top1": float(known[key]["top1"]), "top5": float(known[key]["top5"])}, True
    acc = evaluate(model, dataset, device, progress=progress)
    try:  # a cache that cannot be written costs only the next run's time
        path.parent.mkdir(parents=True, exist_ok=True)
        known = known if isinstance(known, dict) else {}
        known[key] = acc
        atomic_write_json(path, dict(list(known.items())[-256:]))
    except OSError:
        pass
    return acc, False
