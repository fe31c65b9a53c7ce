"""The output-error proxy: measured on proxy images for the weight derivation, read from the whitened
spectrum (no images, no convolution) for the output-aware ones."""

import pytest
import torch
from torch import nn

from svdnas.lowrank.derivation import calibrate
from svdnas.search import grid_candidates, pruning
from svdnas.search.output_proxy import _nearest, output_errors, spectrum_errors


def _model_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, bias=False)).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    mix = torch.randn(2, 3, generator=g, dtype=torch.float64)
    z = torch.randn(40, 2, 10, 10, generator=g, dtype=torch.float64)
    x = torch.einsum("nrhw,rc->nchw", z, mix) + 0.05 * torch.randn(40, 3, 10, 10, generator=g, dtype=torch.float64)
    return model, x


def _setup(kind: str = "whitened"):
    model, x = _model_and_inputs()
    cands = {n: grid_candidates(n, model.get_submodule(n), (10, 10), [0.3, 0.5, 0.7], "flops") for n in ("0", "2")}
    derivation = calibrate(model, kind, {n: c.specs for n, c in cands.items()}, [x[:20], x[20:]], "cpu", damping=1e-12)
    return model, x, cands, derivation


def test_spectrum_error_equals_the_measured_error_where_the_fit_is_exact():
    model, x, cands, derivation = _setup()
    with torch.no_grad():
        inputs = model[0](x).relu()  # the second conv's input
    layer = model[2]
    best = _nearest(cands["2"], 0.5, "flops")
    read = spectrum_errors(layer, cands["2"], best, derivation)
    exact = [f for f in best if f[0] == (3, 3) and f[1][0] == 1]
    assert exact and set(read) == set(best)
    with torch.no_grad():
        y = layer(inputs)
        for fam in exact:
            block = derivation.block("2", layer, [cands["2"].specs[best[fam] - 1]])
            measured = float((block(inputs) - y).pow(2).sum() / y.pow(2).sum())
            assert read[fam] == pytest.approx(measured, rel=1e-6)
    assert all(0 <= e <= 1 for e in read.values())


def test_output_aware_proxy_reads_spectra_without_images(monkeypatch):
    model, _, cands, derivation = _setup()

    def boom(*a, **k):
        raise AssertionError("the proxy captured inputs")

    monkeypatch.setattr(pruning, "capture_inputs", boom)
    errors = pruning.proxy_errors(model, cands, None, 0.5, "cpu", None, None, derivation)
    assert set(errors) == {"0", "2"} and all(len(e) > 1 for e in errors.values())
    assert errors["2"] == output_errors(model[2], None, cands["2"], 0.5, derivation)


def test_weight_derivation_still_measures_on_images():
    model, x, cands, derivation = _setup("weight")
    data = torch.utils.data.TensorDataset(x.float(), torch.zeros(len(x), dtype=torch.long))
    errors = pruning.proxy_errors(model.float(), cands, data, 0.5, "cpu", None, None, derivation)
    assert all(len(e) > 1 for e in errors.values())
