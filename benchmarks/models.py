"""Models for the benchmarks that the zoo does not ship (weights are random: for costs only).

    module:benchmarks/models.py:resnet18_full_fmnist
"""

from svdnas.zoo.resnet import ResNet


def resnet18_full_fmnist() -> ResNet:
    """Full-width ResNet-18 (64..512 channels) at Fashion-MNIST size (28x28 grey, 10 classes, 3x3
    stride-1 stem): the model on which the official release's costs were measured for issue 7."""
    return ResNet((2, 2, 2, 2), 10, 1, 64, small_input=True)
