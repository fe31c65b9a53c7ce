"""Top-1 / top-5 accuracy of a model on a dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent over the whole ``dataset``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    try:
        for x, y in batches(dataset, batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            total += len(y)
            if progress is not None:
                progress(len(y))
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
