"""The spectrum allocations' plans (plain and weighted by each layer's sensitivity) and the check that
keeps the best of them and the search's."""

import copy
import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from svdnas.data.datasets import load_data
from svdnas.lowrank.plan import Plan
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.report.markdown import PLAN_NAMES, markdown
from svdnas.search import SearchConfig, allocation, fraction_grid, grid_candidates
from svdnas.search.allocation import better_plan, log_probs, mean_kl, spectrum_scores
from svdnas.search.output_proxy import _nearest, spectrum_errors
from svdnas.surgery.swap import apply_plan
from tests.conftest import tiny_net
from tests.test_output_proxy import _setup


def test_spectrum_scores_are_the_proxys_errors_and_grow_with_rank():
    model, _, cands, derivation = _setup()
    scores = spectrum_scores(model, cands, derivation)
    for name, c in cands.items():
        row = scores[name]
        assert len(row) == len(c) and row[0] == 0.0 and all(s <= 0 for s in row)
        best = _nearest(c, 0.5, "flops")
        read = spectrum_errors(model.get_submodule(name), c, best, derivation)
        for fam, i in best.items():
            assert -row[i] == pytest.approx(read[fam])
        for i, a in enumerate(c.specs, start=1):  # a larger rank of the same family never errs more
            for j, b in enumerate(c.specs, start=1):
                if a.family() == b.family() and a.rank < b.rank:
                    assert row[i] <= row[j] + 1e-12


def test_the_options_reach_below_the_search_but_not_back_above_it():
    model, _, _, _ = _setup()
    layer = model.get_submodule("2")
    window = grid_candidates("2", layer, (10, 10), [0.6, 0.7, 0.8], "flops")
    gap = sorted({s.rank for s in window.specs if s.family() == window.specs[0].family()})[1]  # a rank the search left out
    search = {"2": window.subset(lambda s: not (s.family() == window.specs[0].family() and s.rank == gap))}
    whole = grid_candidates("2", layer, (10, 10), fraction_grid(0.05, 0.95), "flops")
    opts = allocation.options(search, lambda name: whole, lambda name: True)["2"]
    kept_families = {s.family() for s in search["2"].specs}
    low = {f: min(s.rank for s in search["2"].specs if s.family() == f) for f in kept_families}
    assert set(search["2"].specs) <= set(opts.specs)
    added = [s for s in opts.specs if s not in search["2"].specs]
    assert added and all(s.family() in kept_families and s.rank < low[s.family()] for s in added)
    assert not any(s.family() == window.specs[0].family() and s.rank == gap for s in opts.specs)  # left out stays out
    known = dict(zip(window.specs, window.macs[1:])) | dict(zip(whole.specs, whole.macs[1:]))
    assert all(known[s] == macs for s, macs in zip(opts.specs, opts.macs[1:]))  # costs travel with their specs
    assert allocation.options(search, lambda name: whole, lambda name: False)["2"] is search["2"]


def test_better_plan_keeps_the_one_nearer_the_original():
    model, x, cands, derivation = _setup()
    images = TensorDataset(x.float(), torch.zeros(len(x), dtype=torch.long))
    model = model.float()
    cheapest = {n: min(range(1, len(c)), key=lambda i, c=c: c.macs[i]) for n, c in cands.items()}
    plans = {"rough": Plan({n: cands[n].branches(cheapest[n]) for n in ("0", "2")}), "none": Plan({"0": [], "2": []}),
             "none again": Plan({"0": [], "2": []})}
    kept, summary = better_plan(model, plans, images, "cpu", derivation)
    assert kept == "none" and summary["kl"]["none"] == pytest.approx(0.0, abs=1e-9) == summary["kl"]["none again"]
    assert summary["kl"]["rough"] > 1e-6 and summary["images"] == len(x)
    assert mean_kl(log_probs(model, images, "cpu"), model, images, "cpu") == pytest.approx(0.0, abs=1e-9)


def test_closeness_takes_the_originals_outputs_once_and_scores_a_plan_once(monkeypatch):
    model, x, cands, derivation = _setup()
    images = TensorDataset(x.float(), torch.zeros(len(x), dtype=torch.long))
    model = model.float()
    passes = []
    real = allocation.log_probs
    monkeypatch.setattr(allocation, "log_probs", lambda m, *a, **k: passes.append(m) or real(m, *a, **k))
    closeness = allocation.Closeness(model, images, "cpu")
    cheapest = {n: min(range(1, len(c)), key=lambda i, c=c: c.macs[i]) for n, c in cands.items()}
    rough = Plan({n: cands[n].branches(cheapest[n]) for n in ("0", "2")})
    first = closeness.of_plan(rough, derivation)
    assert len(passes) == 2 and passes[0] is model  # the original's, then the compressed model's
    assert closeness.of_plan(Plan.from_dict(rough.to_dict()), derivation) == first and len(passes) == 2
    other = allocation.Derivation(derivation.kind, derivation.stats, derivation.damping)  # another derivation: scored anew
    closeness.of_plan(rough, other)
    assert len(passes) == 3
    kept, summary = better_plan(model, {"rough": rough, "none": Plan({"0": [], "2": []})}, images, "cpu", derivation, closeness=closeness)
    assert kept == "none" and summary["kl"]["rough"] == first and len(passes) == 4  # only the new plan's pass
    compressed = apply_plan(copy.deepcopy(model), rough, derivation=derivation)
    assert first == pytest.approx(mean_kl(real(model, images, "cpu"), compressed, images, "cpu"), rel=1e-6) and first > 1e-6


def _even_error_kl(model, name, images, reference, r, seed):
    """The mean KL from ``reference`` when ``name``'s output (less its bias) gets noise of relative energy ``r``, spread evenly."""
    layer = model.get_submodule(name)
    g = torch.Generator().manual_seed(seed)

    def hook(m, a, out):
        y = out if m.bias is None else out - m.bias.view(-1, *([1] * (out.dim() - 2)))
        scale = (r * y.flatten(1).square().sum(1) / y[0].numel()).sqrt()
        return out + scale.view(-1, *([1] * (out.dim() - 1))) * torch.randn(out.shape, generator=g)

    handle = layer.register_forward_hook(hook)
    try:
        return mean_kl(reference, model, images, "cpu")
    finally:
        handle.remove()


def test_layer_sensitivity_predicts_the_kl_of_a_small_even_error():
    model = tiny_net().eval()
    g = torch.Generator().manual_seed(3)
    images = TensorDataset(3 * torch.randn(512, 1, 12, 12, generator=g), torch.zeros(512, dtype=torch.long))
    names = ["stem", "body.0", "body.4", "head"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.body.eval()  # a mix of modes, each module's to be restored
    weights = allocation.layer_sensitivity(model, names, images, "cpu")
    assert model.training and model.stem.training and not model.body.training and not model.body[1].training
    assert all(p.grad is None for p in model.parameters()) and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    reference = log_probs(model, images, "cpu")
    r = 1e-3
    for name in names:
        measured = sum(_even_error_kl(model, name, images, reference, r, seed) for seed in range(4)) / 4
        assert measured == pytest.approx(r * weights[name], rel=0.25), name
    assert len({round(w, 12) for w in weights.values()}) == len(names)  # the layers differ: the weights carry information


class _Chain(torch.nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.act = torch.nn.ReLU(inplace=inplace)
        self.mix = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.a(x))
        x = self.act(self.b(self.act(self.b(x))))  # b runs twice: both calls count
        rows = x.mean((2, 3))[:, None, :].expand(-1, 3, -1)  # a linear layer on 3-D input
        return self.out(self.act(self.mix(rows)).mean(1))


def test_layer_sensitivity_reads_outputs_before_in_place_activations_and_frozen_weights():
    g = torch.Generator().manual_seed(2)
    images = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.zeros(64, dtype=torch.long))
    names = ["a", "b", "mix", "out"]
    plain = allocation.layer_sensitivity(_Chain(False).eval(), names, images, "cpu")
    frozen = _Chain(True).eval().requires_grad_(False)
    in_place = allocation.layer_sensitivity(frozen, names, images, "cpu")
    assert all(plain[n] > 0 for n in names)
    assert in_place == pytest.approx(plain, rel=1e-6)  # an in-place ReLU after the layer changes nothing


def test_layer_sensitivity_gives_a_layer_no_gradient_reaches_the_mean_weight():
    model = tiny_net().eval()
    model.bn.register_forward_hook(lambda m, a, out: out.detach())  # the gradient stops after the stem's batch norm
    images = TensorDataset(torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1)), torch.zeros(32, dtype=torch.long))
    reached = ["body.0", "body.4", "head"]
    weights = allocation.layer_sensitivity(model, ["stem", *reached], images, "cpu")
    assert len({weights[n] for n in reached}) == 3 and all(weights[n] > 0 for n in reached)
    assert weights["stem"] == pytest.approx(sum(weights[n] for n in reached) / 3)  # the mean of the layers reached


def test_weights_steer_the_allocation_and_only_their_ratios_count():
    model, _, cands, derivation = _setup()
    total = sum(c.macs[0] for c in cands.values())
    plan = lambda w: allocation.allocate(model, cands, derivation, "flops", 0.1, total, 0.0, ["0", "2"], w).to_json()
    plain = plan(None)
    assert plan({"0": 7.0, "2": 7.0}) == plain == plan({"0": 0.01, "2": 0.01})
    for heavy, light in (("0", "2"), ("2", "0")):
        steered = Plan.from_json(plan({heavy: 1e6, light: 1.0}))
        assert not steered.layers[heavy] and steered.layers[light]  # the weighted layer is left whole, the other pays


def _config(**kw) -> CompressConfig:
    settings = {"reduction": 0.4, "search_images": 200, "proxy_images": 64, "derivation": "whitened"} | kw
    return CompressConfig(search=SearchConfig(epochs=1, batch_size=64, target=0.5), **settings)


@pytest.mark.parametrize("winner", ["search", "spectrum", "weighted", None])
def test_compress_keeps_the_plan_the_check_prefers(tiny_fmnist, tmp_path, monkeypatch, winner):
    seen = {}

    def rigged(model, plans, images, device, derivation, closeness=None):
        seen.update(plans)
        return winner, {"kl": {k: 0.0 for k in plans}, "kept": winner, "images": len(images)}

    if winner:
        monkeypatch.setattr(allocation, "better_plan", rigged)
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), _config(), filter_fn="convs+linear", out=tmp_path / "run")
    check = json.loads((tmp_path / "run" / "report.json").read_text())["plan_check"]
    assert result.report["flops"]["reduction"] >= 0.4 - 0.01  # either plan meets the budget
    assert check["seconds"] > 0 and set(check["kl"]) == {"search", "spectrum", "weighted"}
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    if winner:
        assert seen["search"].to_json() != seen["spectrum"].to_json()  # the check had plans to choose from
        if winner == "weighted":
            assert seen["weighted"].to_json() not in (seen["search"].to_json(), seen["spectrum"].to_json())
        assert result.plan.to_json() == seen[winner].to_json()
        assert history["plan_from"] == {"search": "search", "spectrum": "spectrum allocation", "weighted": "weighted spectrum allocation"}[winner]
        assert f"- plan: {PLAN_NAMES[winner]}, the nearest of 3 to the original on " in markdown(result.report)
    else:
        assert check["kept"] in ("search", "spectrum", "weighted") and check["kl"][check["kept"]] == min(check["kl"].values())


@pytest.mark.parametrize("kw", [{"derivation": "weight"}, {"keep_search_plan": True}, {"branches": 2}, {"reduction": None, "beta": 0.5}])
def test_the_check_is_skipped_where_it_is_not_defined(tiny_fmnist, monkeypatch, kw):
    def boom(*a, **k):
        raise AssertionError("the plan check ran")

    monkeypatch.setattr(allocation, "better_plan", boom)
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), _config(**kw), filter_fn="convs+linear")
    assert "plan_check" not in result.report


def test_report_md_says_which_plan_was_kept_or_why_the_check_was_skipped():
    from svdnas.report.markdown import _plan_check_text

    check = {"kl": {"search": 0.0656, "spectrum": 0.057, "weighted": 0.0321}, "kept": "weighted", "images": 256}
    assert _plan_check_text(check) == ("- plan: the sensitivity-weighted spectrum allocation's, the nearest of 3 to the original on 256 "
                                       "proxy images (mean KL: search 0.0656, spectrum 0.057, weighted 0.0321)")
    assert _plan_check_text({"kept": "search", "skipped": "no plan within the budget"}) == (
        "- plan: the search's (the plan check was skipped: no plan within the budget)")


@pytest.mark.parametrize("weights", [float("nan"), 0.0])
def test_a_weighted_plan_that_cannot_be_made_is_left_out_with_its_reason(tiny_fmnist, monkeypatch, weights):
    monkeypatch.setattr(allocation, "layer_sensitivity", lambda model, names, *a, **k: dict.fromkeys(names, weights))
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), _config(), filter_fn="convs+linear")
    check = result.report["plan_check"]
    reason = "not finite" if math.isnan(weights) else "no gradient reached any layer"
    assert set(check["kl"]) == {"search", "spectrum"} and reason in check["weighted_skipped"]
    assert f"; no sensitivity-weighted plan: {check['weighted_skipped']}" in markdown(result.report)


def test_the_check_reads_the_spectra_once_for_both_allocations(tiny_fmnist, monkeypatch):
    calls = []
    real = allocation.spectrum_scores
    monkeypatch.setattr(allocation, "spectrum_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), _config(), filter_fn="convs+linear")
    assert set(result.report["plan_check"]["kl"]) == {"search", "spectrum", "weighted"} and len(calls) == 1
