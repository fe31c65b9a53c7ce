"""Models for the benchmarks that the zoo does not ship (weights are random: for costs only), loaded
by file path as a ``module:`` spec from the repository root:

    module:benchmarks/bench_models.py:resnet18_full_fmnist
"""

from svdnas.zoo.resnet import ResNet


def resnet18_full_fmnist() -> ResNet:
    """Full-width ResNet-18 (64..512 channels) at Fashion-MNIST size (28x28 grey, 10 classes, 3x3
    stride-1 stem): the model on which the official release's costs were measured."""
    return ResNet((2, 2, 2, 2), 10, 1, 64, small_input=True)
