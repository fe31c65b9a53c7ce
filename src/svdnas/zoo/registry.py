"""Name -> factory for the zoo; ``zoo:NAME`` loads the shipped Fashion-MNIST weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from svdnas.errors import SpecError
from svdnas.zoo.efficientnet import EfficientNet
from svdnas.zoo.mobilenetv2 import MobileNetV2
from svdnas.zoo.resnet import ResNet

WEIGHTS_DIR = Path(__file__).parent / "weights"

ZOO: dict[str, Callable[[], nn.Module]] = {
    # Fashion-MNIST versions: 1x28x28 input, 10 classes, weights shipped. ResNet-18 is half
    # width (32..256 channels) so that the three weight files stay under 40 MB together.
    "resnet18": lambda: ResNet((2, 2, 2, 2), 10, 1, 32, small_input=True),
    "mobilenetv2": lambda: MobileNetV2(10, 1, small_input=True),
    "efficientnet_b0": lambda: EfficientNet(10, 1, small_input=True),
    # ImageNet versions: 3x224x224, 1000 classes, random weights (torchvision-compatible state dicts).
    "resnet18_imagenet": lambda: ResNet((2, 2, 2, 2), 1000, 3, 64),
    "mobilenetv2_imagenet": lambda: MobileNetV2(1000, 3),
    "efficientnet_b0_imagenet": lambda: EfficientNet(1000, 3),
}
INPUT_SHAPES = {name: ((3, 224, 224) if name.endswith("_imagenet") else (1, 28, 28)) for name in ZOO}


def list_models() -> list[str]:
    return sorted(ZOO)


def weights_path(name: str) -> Path | None:
    """The shipped weights of ``name``, or None for the ImageNet-size (random) versions."""
    path = WEIGHTS_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def create_model(name: str) -> nn.Module:
    """A zoo architecture with fresh (random) weights."""
    if name not in ZOO:
        raise SpecError(f"unknown zoo model {name!r}; choose one of {', '.join(list_models())}")
    return ZOO[name]()
