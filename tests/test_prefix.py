"""Fitting a plan's layers in order on the compressed prefix's inputs (the ``prefix`` derivation)."""

import copy

import pytest
import torch
from torch import nn

from svdnas.errors import SpecError
from svdnas.lowrank.calibration import CrossMoments
from svdnas.lowrank.derivation import calibrate
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.spec import LowRankSpec
from svdnas.lowrank.whiten import derive, derive_prefix
from svdnas.surgery.prefix import fit_on_prefix, layer_inputs
from svdnas.surgery.swap import apply_plan

NAMES = ["0", "3", "5"]


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def images(n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)  # smooth, correlated inputs with a mean
    return nn.functional.interpolate(low, size=(10, 10), mode="bilinear") + 0.3


def whole_kernel(rank: int) -> LowRankSpec:
    return LowRankSpec((3, 3), (1, 1), rank)


PLAN = Plan({"0": [whole_kernel(3)], "3": [whole_kernel(3)], "5": [whole_kernel(2)]})


def test_layer_inputs_stop_at_the_layer_and_match_a_hook():
    model, x = net(), images()
    got = layer_inputs(model, "3", [x[:8], x[8:]], "cpu")
    expected = model[:3](x)
    torch.testing.assert_close(torch.cat(got), expected)


def test_each_layer_is_the_asymmetric_fit_on_the_prefix_before_it():
    model, x = net(), images()
    batches = [x[:12], x[12:]]
    fit = fit_on_prefix(model, PLAN, NAMES, batches, "cpu", damping=1e-12, ridge=0)
    # the first layer sees the original inputs: its fit is the whitened one with a bias correction
    first = derive(model[0], PLAN.layers["0"], "whitened", calibrate(model, "whitened", {"0": PLAN.layers["0"]}, batches, "cpu").stats["0"],
                   damping=1e-12, bias_correction=True)
    for a, b in zip(fit.model[0].parameters(), first.parameters()):
        torch.testing.assert_close(a, b)
    # the second: cross moments of the original model's and the fitted prefix's inputs, computed here
    stats = CrossMoments(model[3], [((3, 3), (1, 1))])
    prefix = nn.Sequential(fit.model[0], model[1], model[2])
    stats.update(model[:3](x), prefix(x))
    second = derive_prefix(model[3], PLAN.layers["3"], stats, damping=1e-12, bias_correction=True, ridge=0)
    for a, b in zip(fit.model[3].parameters(), second.parameters()):
        torch.testing.assert_close(a, b)
    assert model[0].bias is None and fit.model[0].branches[0].second.bias is not None  # the shift got a bias


def test_prefix_fit_lowers_every_layers_error_and_the_models():
    model, x = net(), images()
    batches = [x]
    whitened = calibrate(model, "whitened", PLAN.layers, batches, "cpu", damping=1e-12)
    fit = fit_on_prefix(model, PLAN, NAMES, batches, "cpu", whitened, damping=1e-12)
    for name, e in fit.errors.items():
        # the whole kernel in the first layer, no groups: the fit is the least-squares optimum, and
        # the bias shift only lowers it further
        assert e["fitted"] <= e["derived"] * (1 + 1e-9), name
    assert fit.errors["5"]["fitted"] < 0.9 * fit.errors["5"]["derived"]  # errors no longer compound
    plain = copy.deepcopy(model)  # the whitened model, layer by layer
    for name, specs in PLAN.layers.items():
        plain[int(name)] = whitened.block(name, model[int(name)], specs)
    y = model(x)
    with torch.no_grad():
        err = lambda m: float((m(x) - y).pow(2).sum() / y.pow(2).sum())
        assert err(fit.model) < err(plain)
    assert isinstance(model[0], nn.Conv2d) and model[0].bias is None  # the original is untouched


def wide_pointwise() -> nn.Module:
    """1x1 layers on a 1x1 map, 24 channels in: a few images are fewer samples than the input's dimension."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(24, 24, 1), nn.ReLU(), nn.Conv2d(24, 24, 1), nn.ReLU(), nn.Conv2d(24, 8, 1)).double().eval()


def pointwise_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (torch.randn(n, 24, generator=g, dtype=torch.float64) @ mix).reshape(n, 24, 1, 1)


def test_held_out_images_keep_the_derivations_factors_where_the_fit_follows_its_few_samples():
    """12 calibration samples for 24 input channels: the least-squares target fits them and not the
    data. Measured on held-out images, such a layer keeps the whitened factors; every layer's module
    is the one its ``kept`` names, and its reported errors are those of the held-out images."""
    model = wide_pointwise()
    names = ["0", "2", "4"]
    plan = Plan({n: [LowRankSpec((1, 1), (1, 1), 6)] for n in names})
    calibration, held_out = [pointwise_images(12, 1)], [pointwise_images(400, 2)]
    whitened = calibrate(model, "whitened", plan.layers, calibration, "cpu")
    plain = fit_on_prefix(model, plan, names, calibration, "cpu", whitened)
    gated = fit_on_prefix(model, plan, names, calibration, "cpu", whitened, held_out=held_out)
    assert plain.held_out == 0 and gated.held_out == 400 and gated.images == plain.images == 12
    assert all(e["kept"] == "fitted" for e in plain.errors.values())  # no held-out images: the fit, as before
    kept = {n: e["kept"] for n, e in gated.errors.items()}
    assert "derived" in kept.values()  # the case this guards against happens here
    x = held_out[0]
    with torch.no_grad():
        inputs = {n: [] for n in names}
        hooks = [gated.model[int(n)].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in names]
        gated.model(x)
        for h in hooks:
            h.remove()
        for name in names:
            reference = model[int(name)](model[: int(name)](x))
            err = lambda m, name=name, r=reference: float((m(inputs[name][0]) - r).pow(2).sum() / r.pow(2).sum())
            own = whitened.block(name, model[int(name)], plan.layers[name])
            e = gated.errors[name]
            assert e["derived"] == pytest.approx(err(own)) and e["kept"] == ("derived" if e["derived"] < e["fitted"] else "fitted")
            assert err(gated.model[int(name)]) == pytest.approx(min(e["derived"], e["fitted"]))
            if e["kept"] == "derived":
                for a, b in zip(gated.model[int(name)].parameters(), own.parameters()):
                    torch.testing.assert_close(a, b)
        y = model(x)
        final = lambda m: float((m(x) - y).pow(2).sum() / y.pow(2).sum())
        assert final(gated.model) < final(plain.model)  # and the model is nearer the original on them


def test_a_layer_the_forward_pass_never_calls_is_named():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = net(), nn.Conv2d(8, 8, 1).double()

        def forward(self, x):
            return self.body(x)

    with pytest.raises(SpecError, match="layer unused was not called"):
        fit_on_prefix(WithSpare(), Plan({"unused": [LowRankSpec((1, 1), (1, 1), 2)]}), ["unused"], [images()], "cpu")


def test_compress_with_the_prefix_derivation_writes_a_run_that_loads(trained_tiny, tmp_path, monkeypatch):
    import svdnas
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.search import SearchConfig, allocation
    from tests.conftest import TinyNet

    model, data = trained_tiny
    scored = []
    real_log_probs = allocation.log_probs
    monkeypatch.setattr(allocation, "log_probs", lambda m, *a, **k: scored.append(m) or real_log_probs(m, *a, **k))
    config = CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                            derivation="prefix", calibration_images=64, search=SearchConfig(epochs=1, target=0.5))
    result = compress(model, data, config, filter_fn="convs", seed=0, out=tmp_path / "run")
    fit = result.report["calibration"]["prefix_fit"]
    compressed = [n for n, s in result.plan.layers.items() if s]
    assert fit["images"] == 64 and sorted(fit["relative_output_error"]) == sorted(compressed)
    assert fit["held_out_images"] == 32 and set(fit["kept_derived"]) <= set(compressed)  # the proxy's images, apart
    check = fit["model_check"]
    assert check["kept"] == min(check["mean_kl"], key=check["mean_kl"].get)
    # the plan check scored the same plan with the same factors on the same (proxy) images: its score is
    # reused, and the original's outputs there were taken once
    plan_check = result.report["plan_check"]
    assert "skipped" not in plan_check and check["mean_kl"]["derived"] == plan_check["kl"][plan_check["kept"]]
    assert sum(m is scored[0] for m in scored) == 1 and len(scored) == 1 + len(set(plan_check["kl"].values())) + 1
    assert result.report["derivation"] == "prefix" and "prefix_fit" in result.report["seconds"]
    loaded = svdnas.load(str(tmp_path / "run"), base_model=TinyNet()).eval()
    x = data.test.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x))


@pytest.mark.parametrize("keep_search_plan", [False, True])
def test_a_fit_farther_from_the_original_than_the_searchs_factors_is_not_kept(trained_tiny, monkeypatch, keep_search_plan):
    """The whole fitted model is checked on the held-out (proxy) images against the search's own
    factors: a fit that went wrong (here every fitted weight scaled by 3) gives way to them. Where no
    plan check scored the plan first (``keep_search_plan``), the model check builds them once and keeps
    the model it scored; after a plan check (which keeps scores, not models) they are built again."""
    from svdnas.lowrank.derivation import Derivation
    from svdnas.pipeline import stages
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.search import SearchConfig, allocation
    from svdnas.surgery import prefix

    model, data = trained_tiny
    searched: list[Derivation] = []
    real = prefix.fit_on_prefix

    def spoiled(original, plan, order, batches, device, derivation=None, **kw):
        searched.append(derivation)
        fit = real(original, plan, order, batches, device, derivation, **kw)
        with torch.no_grad():
            for name, specs in plan.layers.items():
                if specs:
                    for p in fit.model.get_submodule(name).parameters():
                        p.mul_(3)
        return fit

    built = []

    def counted(module):
        real_apply = module.apply_plan
        monkeypatch.setattr(module, "apply_plan", lambda m, plan, **kw: built.append(plan.to_json()) or real_apply(m, plan, **kw))

    counted(stages)
    counted(allocation)
    monkeypatch.setattr(stages, "fit_on_prefix", spoiled)
    config = CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                            derivation="prefix", calibration_images=64, search=SearchConfig(epochs=1, target=0.5),
                            keep_search_plan=keep_search_plan)
    result = compress(model, data, config, filter_fn="convs", seed=0)
    check = result.report["calibration"]["prefix_fit"]["model_check"]
    assert check["kept"] == "derived" and check["mean_kl"]["derived"] < check["mean_kl"]["fitted"]
    assert ("plan_check" in result.report) is not keep_search_plan
    assert built.count(result.plan.to_json()) == (1 if keep_search_plan else 2)
    expected = apply_plan(copy.deepcopy(model), result.plan, derivation=searched[0]).eval()
    x = data.test.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), expected(x))


def test_a_bias_added_by_the_correction_survives_the_run_directory(tmp_path):
    import svdnas
    from svdnas.runs.directory import PYTHON_BASE, save_run

    model, x = net(), images()
    fit = fit_on_prefix(model, PLAN, NAMES, [x], "cpu")
    assert fit.model[0].branches[0].second.bias is not None  # the original layer 0 has none
    save_run(tmp_path, fit.model, PLAN, PYTHON_BASE, (3, 10, 10))
    loaded = svdnas.load(str(tmp_path), base_model=net()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fit.model(x))


def test_the_exact_refit_lowers_the_prefix_error_where_the_pooled_fit_approximates():
    """A (3, 1) split: the second layer sums the first's outputs over three offsets, so the pooled fit
    is not the optimum; the refit on W* = W C_oc C_cc^-1 lowers the true error measured on samples."""
    model, x = net(), images()
    plan = Plan({"0": [LowRankSpec((3, 1), (1, 1), 3)], "3": [LowRankSpec((3, 1), (1, 1), 4)]})
    pooled = fit_on_prefix(model, plan, NAMES, [x], "cpu", damping=1e-12)
    exact = fit_on_prefix(model, plan, NAMES, [x], "cpu", damping=1e-12, refit_iters=6)
    # the first layer sees the same inputs in both; the second sees the same fitted prefix only if the
    # first layers agree, so compare layer 0 (same inputs) and the errors each run reports
    assert exact.errors["0"]["fitted"] < 0.99 * pooled.errors["0"]["fitted"]
    assert exact.errors["3"]["fitted"] < pooled.errors["3"]["fitted"]


def test_one_pass_per_batch_fits_as_a_pass_per_layer_does(monkeypatch):
    """The lockstep passes (each batch's forward paused at every layer of the plan) give the same fit
    as the forward pass per layer they replace, and the fallback is taken where the order differs."""
    from svdnas.surgery import prefix

    model, x = net(), images()
    batches = [x[:10], x[10:]]
    calls = []
    real = prefix.layer_inputs
    monkeypatch.setattr(prefix, "layer_inputs", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    fast = fit_on_prefix(model, PLAN, NAMES, batches, "cpu", damping=1e-12, refit_iters=2)
    assert calls == []  # no pass per layer
    slow = prefix._fit(model, PLAN, NAMES, batches, "cpu", lockstep=False, derivation=prefix.Derivation(), held_out=0,
                       bias_correction=True, refit_iters=2, damping=1e-12, ridge=prefix.PREFIX_RIDGE, sampling=None, progress=None)
    for a, b in zip(fast.model.parameters(), slow[0].parameters()):
        torch.testing.assert_close(a, b)
    for name in NAMES:
        assert fast.errors[name]["kept"] == slow[1][name]["kept"] == "fitted"
        assert [fast.errors[name][k] for k in ("derived", "fitted")] == pytest.approx([slow[1][name][k] for k in ("derived", "fitted")])
    assert not any(isinstance(m, prefix._Gate) for m in fast.model.modules()) and not any(isinstance(m, prefix._Gate) for m in model.modules())
    # the plan's order against the forward pass's: the lockstep notices and the fit falls back
    backwards = fit_on_prefix(model, PLAN, NAMES[::-1], batches, "cpu", damping=1e-12)
    assert calls and set(backwards.errors) == set(NAMES)


def test_the_original_pass_hands_on_outputs_an_in_place_activation_cannot_change():
    """The original model's passes bring each layer's output with its input; an in-place ReLU right
    after the layer runs only once the pass is let on, after that layer's fit, so the lockstep fit
    still equals the pass-per-layer one (which computes the outputs itself)."""
    from svdnas.surgery import prefix

    model = net()
    for i in (4, 6):
        model[i] = nn.ReLU(inplace=True)
    batches = [images()[:10], images()[10:]]
    fast = fit_on_prefix(model, PLAN, NAMES, batches, "cpu", damping=1e-12)
    slow = prefix._fit(model, PLAN, NAMES, batches, "cpu", lockstep=False, derivation=prefix.Derivation(), held_out=0,
                       bias_correction=True, refit_iters=0, damping=1e-12, ridge=prefix.PREFIX_RIDGE, sampling=None, progress=None)
    for a, b in zip(fast.model.parameters(), slow[0].parameters()):
        torch.testing.assert_close(a, b)
    # what the original stream brings is the layer's own input and output
    stream = prefix.Lockstep(copy.deepcopy(model), NAMES, batches, "cpu", outputs=True)
    try:
        for name in NAMES:
            (x, y), _ = prefix.step_together([stream], name)[0]
            expected_x = model[: int(name)](batches[0])
            torch.testing.assert_close(x, expected_x)
            torch.testing.assert_close(y, model[int(name)](expected_x))
    finally:
        stream.close()


def test_the_fit_leaves_torchs_thread_counts_as_they_were():
    """The passes compute on threads of their own with fewer intra-op threads; neither the caller's
    count nor the one a thread started later begins with changes."""
    import threading

    before = torch.get_num_threads()
    fit_on_prefix(net(), PLAN, NAMES, [images(), images()], "cpu")
    assert torch.get_num_threads() == before
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [before]
