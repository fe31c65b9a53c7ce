"""Real data: Fashion-MNIST IDX files and image folders, and the fixed search subset."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from svdnas.errors import DataError

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32}


@dataclass
class DataBundle:
    """The splits of one data spec.

    Attributes:
        train: labelled training split (search, proxy and fine-tuning images are drawn from it).
        test: evaluation split (the whole of it is used for accuracy).
        input_shape: shape of one image, (C, H, W).
        num_classes: number of labels.
        name: the spec it came from.
    """

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str


def read_idx(path: Path) -> Tensor:
    """Read one IDX file (optionally gzipped) into a tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[data[2]]
    flat = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=dtype)
    if dtype != torch.uint8 and dtype != torch.int8:
        flat = flat.view(torch.uint8).view(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)  # big-endian
    count = 1
    for s in shape:
        count *= s
    if flat.numel() != count:
        raise DataError(f"{path}: header promises {count} values, file holds {flat.numel()}")
    return flat.reshape(shape)


def fmnist_dir(root: str | None = None) -> Path:
    """Where the Fashion-MNIST files are: ``root``, else $SVDNAS_FMNIST, else Debian's location.

    Raises:
        DataError: the folder named (``root`` or a set $SVDNAS_FMNIST) is missing, or none is found.
    """
    named = root or os.environ.get("SVDNAS_FMNIST")
    if named and not Path(named).is_dir():  # a folder named on purpose is not replaced by another
        source = "fmnist:DIR" if root else "$SVDNAS_FMNIST"
        raise DataError(f"Fashion-MNIST not found at {named} ({source}): no such folder; point it at the folder of the IDX files")
    candidates = [root] if root else [os.environ.get("SVDNAS_FMNIST"), FMNIST_DEFAULT_DIR]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    where = root or " or ".join(c for c in candidates if c)
    raise DataError(
        f"Fashion-MNIST not found at {where}; install Debian's dataset-fashion-mnist "
        "or point $SVDNAS_FMNIST (or fmnist:DIR) at the IDX files"
    )


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root} holds no {stem}[.gz]; is it the Fashion-MNIST folder?")


def load_fmnist(root: str | None = None) -> DataBundle:
    """Fashion-MNIST as normalised float tensors (N, 1, 28, 28)."""
    d = fmnist_dir(root)

    def split(prefix: str) -> TensorDataset:
        x = read_idx(_find(d, f"{prefix}-images-idx3-ubyte")).float().div_(255.0)
        y = read_idx(_find(d, f"{prefix}-labels-idx1-ubyte")).long()
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise DataError(f"{d}: {prefix} images and labels disagree or are empty")
        return TensorDataset(x.sub_(FMNIST_MEAN).div_(FMNIST_STD).unsqueeze(1), y)

    return DataBundle(split("train"), split("t10k"), (1, 28, 28), 10, f"fmnist:{d}")


def search_subset(dataset: Dataset, n: int, seed: int, exclude: Tensor | None = None) -> tuple[Subset, Tensor]:
    """A fixed labelled subset of ``n`` images drawn with ``seed``, avoiding indices in ``exclude``.

    Returns the subset and its indices, so that other subsets can be kept apart from it.
    """
    total = len(dataset)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=g)
    if exclude is not None and exclude.numel():
        mask = torch.ones(total, dtype=torch.bool)
        mask[exclude] = False
        order = order[mask[order]]
    if n > order.numel():
        raise DataError(f"asked for {n} images but only {order.numel()} are available")
    idx = order[:n].sort().values
    return Subset(dataset, idx.tolist()), idx


_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


class ImageFolder(Dataset):
    """``ROOT/CLASS/*.jpg`` with ImageNet preprocessing (resize 256, centre crop 224, normalise)."""

    def __init__(self, root: Path, classes: list[str], size: int = 224) -> None:
        self.size = size
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(classes):
            folder = root / cls
            if folder.is_dir():
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTS)
                self.samples += [(p, label) for p in files]
        if not self.samples:
            raise DataError(f"{root} holds no images (expected {root}/CLASS/*.jpg)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = round(self.size * 256 / 224) / min(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, label


def load_imagefolder(root: str) -> DataBundle:
    """``root/train/CLASS/*`` and ``root/val/CLASS/*``; the class list comes from train."""
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise DataError("imagefolder data needs Pillow: pip install 'svdnas[images]'") from e
    base = Path(root)
    train_dir, val_dir = base / "train", base / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataError(f"imagefolder:{root} needs {d}/CLASS/*.jpg")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders")
    return DataBundle(ImageFolder(train_dir, classes), ImageFolder(val_dir, classes), (3, 224, 224), len(classes), f"imagefolder:{root}")


def load_data(spec: str) -> DataBundle | None:
    """The DATA spec of the contract: ``fmnist[:DIR]``, ``imagefolder:DIR`` or ``none`` (returns None)."""
    kind, _, rest = spec.partition(":")
    if spec == "none":
        return None
    if kind == "fmnist":
        return load_fmnist(rest or None)
    if kind == "imagefolder" and rest:
        return load_imagefolder(rest)
    raise DataError(f"unknown data spec {spec!r}: use fmnist, fmnist:DIR, imagefolder:DIR or none")
