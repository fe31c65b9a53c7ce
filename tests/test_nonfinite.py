"""NaN and inf: refused in weights before any work, and a search that meets one stops, naming the
step and the layer, with the last good checkpoint left as it was."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from svdnas.cost.counting import model_macs
from svdnas.data.datasets import load_data
from svdnas.errors import NonFiniteError, SvdnasError, WeightsError
from svdnas.pipeline.baseline import run_baseline
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig, build_supernet, fraction_grid, grid_candidates, search
from tests.conftest import TinyNet, tiny_net

SEARCH_IMAGES, BATCH = 200, 64
STEPS = -(-SEARCH_IMAGES // BATCH)  # per epoch


class _BlowUp(nn.Module):
    """The identity for the first ``after`` forward passes that build a graph (search steps), NaN after."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
        return x * float("nan") if self.calls > self.after else x


class Fragile(TinyNet):
    """TinyNet whose activations turn to NaN once the search has taken ``after`` steps."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.blowup = _BlowUp(after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blowup(torch.relu(self.bn(self.stem(x))))
        return self.head(self.body(x).mean((2, 3)))


def _config(epochs: int = 3) -> CompressConfig:
    search_config = SearchConfig(epochs=epochs, batch_size=BATCH, target=0.5)
    return CompressConfig(reduction=0.4, search_images=SEARCH_IMAGES, families=0, search=search_config)


@pytest.mark.slow
def test_nan_during_search_stops_and_keeps_the_last_checkpoint(tiny_fmnist, tmp_path):
    data = load_data(f"fmnist:{tiny_fmnist}")
    model = Fragile(after=STEPS + 1).eval()
    model.load_state_dict(tiny_net().state_dict(), strict=False)
    ckpt = tmp_path / "checkpoint-b1_search.pt"
    seen: dict[str, bytes] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if done == STEPS + 1:  # the first step of epoch 2: epoch 1's checkpoint is on disk
            seen["checkpoint"] = ckpt.read_bytes()

    with pytest.raises(NonFiniteError) as info:
        compress(model, data, _config(), filter_fn="convs", out=tmp_path, progress=progress, resume=True)
    message = str(info.value)
    assert "search loss is not finite" in message and "at epoch 2, step 2" in message
    assert "first at the output of blowup" in message
    assert f"the checkpoint of epoch 1 is kept in {ckpt}" in message
    assert ckpt.read_bytes() == seen["checkpoint"]
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["thetas"])
    assert not (tmp_path / "report.json").exists()

    # the kept checkpoint is good to resume from, once the model behaves
    healthy = TinyNet().eval()
    healthy.load_state_dict(tiny_net().state_dict())
    result = compress(healthy, data, _config(), filter_fn="convs", out=tmp_path, resume=True)
    assert result.history["epoch"] == [1, 2, 3] and (tmp_path / "report.json").is_file()


def test_non_finite_logits_name_the_layer(tmp_path):
    torch.manual_seed(0)
    model = tiny_net().eval()
    hw = {"body.0": (28, 28), "body.4": (14, 14)}
    cands = {n: grid_candidates(n, model.get_submodule(n), hw[n], fraction_grid(0.2, 0.8)) for n in hw}
    supernet, mixed = build_supernet(model, cands)
    mixed["body.4"].theta.register_hook(lambda g: torch.full_like(g, float("nan")))
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    costs = {n: c.cost("flops") for n, c in cands.items()}
    with pytest.raises(NonFiniteError) as info:
        search(supernet, mixed, data, SearchConfig(epochs=2, batch_size=16, target=0.5), costs,
               float(model_macs(model, (1, 28, 28))), checkpoint=tmp_path / "ckpt.pt")
    message = str(info.value)
    assert message.startswith("the logits of layer body.4 are not finite after epoch 1, step 1")
    assert "no epoch had finished, so there is no checkpoint" in message
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("method", ["svdnas", "uniform"])
def test_non_finite_weights_are_refused_before_any_work(tiny_fmnist, method):
    data = load_data(f"fmnist:{tiny_fmnist}")
    model = tiny_net().eval()
    with torch.no_grad():
        model.body[4].bias[5] = float("nan")
    with pytest.raises(WeightsError, match=r"^the model: 'body.4.bias' holds NaN \(1 of 24 values\)") as info:
        if method == "svdnas":
            compress(model, data, _config(), filter_fn="convs")
        else:
            run_baseline(method, model, data, 0.4)
    assert isinstance(info.value, SvdnasError)
