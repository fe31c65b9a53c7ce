"""The shipped models: the paper's three architectures at Fashion-MNIST and ImageNet size."""

from svdnas.zoo.registry import ZOO, create_model, list_models, weights_path

__all__ = ["ZOO", "create_model", "list_models", "weights_path"]
