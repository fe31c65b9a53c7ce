import gzip
import struct
from pathlib import Path

import pytest
import torch
from torch import nn


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    codes = {torch.uint8: 0x08}
    header = bytes([0, 0, codes[tensor.dtype], tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.contiguous().numpy().tobytes())


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped data set (IDX files) whose label is readable from the image: class c
    lights up row block c, so a tiny model can learn it."""
    root = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 * c : 2 * c + 3, :] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))
    return root


class TinyNet(nn.Module):
    """A small CNN with the layer kinds svdnas meets in practice."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: left alone
            nn.Conv2d(16, 24, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.body(x).mean((2, 3)))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny() -> nn.Module:
    return tiny_net().eval()
