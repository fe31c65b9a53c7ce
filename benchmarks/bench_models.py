"""Models for the benchmarks that the zoo does not ship, loaded by file path as a ``module:`` spec
from the repository root:

    module:benchmarks/bench_models.py:resnet18_full_fmnist   (random weights: for costs only)
    module:benchmarks/bench_models.py:vgg_fmnist_trained     (trained here by benchmarks/tools/train_bench_model.py)
"""

import os
from pathlib import Path

from torch import nn

from svdnas.zoo.resnet import ResNet


def resnet18_full_fmnist() -> ResNet:
    """Full-width ResNet-18 (64..512 channels) at Fashion-MNIST size (28x28 grey, 10 classes, 3x3
    stride-1 stem): the model on which the official release's costs were measured."""
    return ResNet((2, 2, 2, 2), 10, 1, 64, small_input=True)


# ---- a trained model of another definition than the zoo's, for the derivation's benchmarks ----

VGG_WEIGHTS = Path(os.environ.get("SVDNAS_CACHE", Path.home() / ".cache" / "svdnas")) / "bench" / "vgg_fmnist.safetensors"


class VGG(nn.Module):
    """A VGG-11-like network with BatchNorm at Fashion-MNIST size: eight 3x3 convs (32..256 channels,
    biases kept), four max-pools, global average pooling and one linear layer."""

    def __init__(self, widths=(32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def vgg_fmnist() -> VGG:
    """The VGG with random weights (what benchmarks/tools/train_bench_model.py trains)."""
    return VGG()


def vgg_fmnist_trained() -> VGG:
    """The VGG with the weights benchmarks/tools/train_bench_model.py wrote to the cache."""
    from svdnas.models.weights import load_weights

    if not VGG_WEIGHTS.is_file():
        raise FileNotFoundError(f"{VGG_WEIGHTS} is missing: run .venv/bin/python -m benchmarks.tools.train_bench_model first")
    model = VGG()
    load_weights(model, str(VGG_WEIGHTS))
    return model.eval()
