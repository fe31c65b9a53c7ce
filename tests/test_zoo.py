import pytest
import torch

from svdnas.cost.counting import count_params, model_macs
from svdnas.models.build import build_model
from svdnas.zoo import create_model, list_models, weights_path
from svdnas.zoo.registry import INPUT_SHAPES

# Parameter counts of torchvision's resnet18, mobilenet_v2 and efficientnet_b0 (1000 classes).
TORCHVISION_PARAMS = {"resnet18_imagenet": 11_689_512, "mobilenetv2_imagenet": 3_504_872, "efficientnet_b0_imagenet": 5_288_548}


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_and_gradients(name):
    model = create_model(name)
    shape = INPUT_SHAPES[name]
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 10 if shape[0] == 1 else 1000)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("name", "params"), TORCHVISION_PARAMS.items())
def test_imagenet_versions_match_torchvision_sizes(name, params):
    model = create_model(name)
    assert count_params(model) == params


def test_torchvision_key_names():
    keys = set(create_model("resnet18_imagenet").state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= keys
    keys = set(create_model("mobilenetv2_imagenet").state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight", "features.2.conv.0.0.weight",
            "features.2.conv.2.weight", "features.18.1.running_mean", "classifier.1.weight"} <= keys
    keys = set(create_model("efficientnet_b0_imagenet").state_dict())
    assert {"features.0.0.weight", "features.1.0.block.0.0.weight", "features.1.0.block.1.fc1.weight",
            "features.2.0.block.2.fc2.bias", "features.2.0.block.3.1.weight", "features.8.0.weight", "classifier.1.bias"} <= keys


def test_imagenet_resnet18_flops_match_the_published_figure():
    """ResNet-18 at 224x224: 1,814,073,344 MACs in its convs and fc (the published 1.81 G; the stem
    alone is 112 * 112 * 64 * 3 * 7 * 7 = 118,013,952); thop, as model_macs counts, adds the
    BatchNorm, ReLU and pooling work on top (the 1.82 G quoted for thop)."""
    from torch import nn

    model = create_model("resnet18_imagenet").eval()
    counted = 0

    def hook(m, _, out):
        nonlocal counted
        counted += out.numel() * m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    assert counted == 1_814_073_344
    assert counted < model_macs(model, (3, 224, 224)) < 1.01 * counted


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnet_b0"])
def test_shipped_weights_load(name):
    if weights_path(name) is None:
        pytest.skip(f"{name} weights not trained yet")
    model, info = build_model(f"zoo:{name}")
    assert info.weights is not None and not model.training


FLOORS = {"resnet18": 92.0, "mobilenetv2": 91.0, "efficientnet_b0": 91.0}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLOORS))
def test_eval_command_meets_the_accuracy_floor(name):
    import json

    from svdnas.data.datasets import fmnist_dir
    from svdnas.errors import DataError

    if weights_path(name) is None:
        pytest.skip(f"{name} weights not trained yet")
    try:
        fmnist_dir()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    from tests.conftest import run_cli

    r = run_cli("eval", f"zoo:{name}", "--data", "fmnist", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["top1"] >= FLOORS[name]
