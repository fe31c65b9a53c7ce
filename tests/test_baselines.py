import pytest
import torch

from svdnas.baselines.methods import METHODS, SPLITS, baseline_plan, split_kernel
from svdnas.cost.counting import model_macs
from svdnas.errors import BudgetError, SpecError
from svdnas.lowrank.modules import LowRankBlock
from svdnas.pipeline.baseline import run_baseline
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers
from svdnas.zoo import create_model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    infos = trace_layers(model, example_input(model, (1, 28, 28)))
    targets, _ = select_targets(model, infos, "all-but-first")
    return model, infos, targets, model_macs(model, (1, 28, 28))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", [0.4, 0.7])
def test_budget_met_and_tight(resnet, method, reduction):
    import copy

    model, infos, targets, total = resnet
    plan = baseline_plan(method, model, infos, targets, reduction, total, "kx1")
    achieved = 1 - model_macs(apply_plan(copy.deepcopy(model), plan), (1, 28, 28)) / total
    assert reduction <= achieved < reduction + 0.03


def test_uniform_uses_one_rank_fraction(resnet):
    model, infos, targets, total = resnet
    plan = baseline_plan("uniform", model, infos, targets, 0.5, total, "1x1")
    fractions = set()
    for name, specs in plan.layers.items():
        if specs:
            w = model.get_submodule(name).weight
            fractions.add(round(specs[0].rank / min(w.shape[0], w.shape[1] * 1), 1))
            assert specs[0].first_kernel == (1, 1)
    assert len(fractions) <= 2  # one fraction, up to rounding of small layers


def test_splits_and_errors(resnet):
    assert split_kernel("kx1", (3, 3)) == (3, 1) and split_kernel("1xk", (3, 3)) == (1, 3)
    assert split_kernel("kxk", (1, 1)) == (1, 1) and len(SPLITS) == 4
    with pytest.raises(SpecError, match="--split"):
        split_kernel("diagonal", (3, 3))
    model, infos, targets, total = resnet
    with pytest.raises(BudgetError, match="rank 1 everywhere"):
        baseline_plan("uniform", model, infos, targets, 0.995, total)


def test_best_split_is_the_most_accurate_on_search_images(tiny_fmnist):
    from svdnas.data.datasets import load_data
    from tests.conftest import tiny_net

    data = load_data(f"fmnist:{tiny_fmnist}")
    _, _, report = run_baseline("energy", tiny_net(), data, 0.5, filter_fn="convs", split="best", search_images=100)
    tried = report["split_search"]["top1_on_search_images"]
    assert set(tried) == set(SPLITS)
    assert tried[report["split"]] == max(tried.values())
    assert report["flops"]["reduction"] >= 0.49


def test_a_baselines_seconds_do_not_count_a_stage_twice(tiny_fmnist):
    """``search`` is the method's own choosing (allocation, split); the statistics and the prefix fit,
    one per split here, add up under their own keys, and the stages together stay within the total."""
    from svdnas.data.datasets import load_data
    from tests.conftest import tiny_net

    data = load_data(f"fmnist:{tiny_fmnist}")
    _, _, report = run_baseline("uniform", tiny_net(), data, 0.5, filter_fn="convs", split="best", search_images=100,
                                derivation="prefix", calibration_images=64)
    seconds = report["seconds"]
    assert set(report["split_search"]["top1_on_search_images"]) == set(SPLITS)
    assert seconds["search"] > 0 and seconds["calibration"] > 0 and seconds["prefix_fit"] > 0
    assert report["calibration"]["seconds"] < seconds["calibration"]  # the kept split's own, of four
    stages = sum(v for k, v in seconds.items() if k != "total")
    assert stages <= seconds["total"]


def _alds_error(original: torch.nn.Module, replaced: torch.nn.Module) -> float:
    """ALDS's error measured on the derived module's own weights: the largest operator norm of the
    residual over the first layer's channel groups, over ||W||_2 (W unfolded to O x (I kh kw))."""
    w = original.weight.detach()
    if w.dim() == 2:
        w = w[:, :, None, None]
    if not isinstance(replaced, LowRankBlock):  # left as it was
        return 0.0
    (branch,) = replaced.branches
    o, i, kh, kw = w.shape
    g = branch.first.groups
    first = branch.first.weight.detach().reshape(g, -1, i // g, kh, kw)  # a 1x1 second layer: kxk split
    second = branch.second.weight.detach().reshape(o, g, -1)
    dense = torch.einsum("ogr,grihw->ogihw", second, first).reshape(o, i, kh, kw)
    residual = (w - dense).double().reshape(o, g, -1)
    worst = max(torch.linalg.matrix_norm(residual[:, j], ord=2) for j in range(g))
    return float(worst / torch.linalg.matrix_norm(w.double().reshape(o, -1), ord=2))


def _plan_errors(model, plan) -> dict[str, float]:
    import copy

    compressed = apply_plan(copy.deepcopy(model), plan)
    return {n: _alds_error(model.get_submodule(n), compressed.get_submodule(n)) for n in plan.layers}


def test_alds_finds_the_brute_force_minimax(tiny):
    """On a three-layer model, every (k, rank) combination: ALDS's largest error is the smallest possible."""
    import itertools

    from svdnas.baselines.alds import max_relative_error
    from svdnas.cost.counting import layer_cost
    from svdnas.lowrank.decompose import decompose
    from svdnas.lowrank.space import divisors
    from svdnas.lowrank.spec import LowRankSpec, family_max_rank

    infos = trace_layers(tiny, example_input(tiny, (1, 28, 28)))
    targets, _ = select_targets(tiny, infos, "convs")
    total = model_macs(tiny, (1, 28, 28))
    options = {}  # name -> [(error, macs)], the layer as it is included
    for name in targets:
        layer, hw = tiny.get_submodule(name), infos[name].input_hw
        o, i, kh, kw = layer.weight.shape
        cost0 = layer_cost(layer, hw)[0]
        options[name] = [(0.0, cost0)]
        for k in divisors(i):
            family = LowRankSpec((kh, kw), (k, 1), 1)
            for r in range(1, family_max_rank(family, o, i, (kh, kw)) + 1):
                macs = layer_cost(layer, hw, [family.with_rank(r)])[0]
                if macs < cost0:
                    options[name].append((_alds_error(layer, decompose(layer, [family.with_rank(r)])), macs))
    fixed = total - sum(layer_cost(tiny.get_submodule(n), infos[n].input_hw)[0] for n in targets)
    for reduction in (0.3, 0.5):
        budget = (1 - reduction) * total - fixed
        best = min(max(e for e, _ in combo) for combo in itertools.product(*options.values())
                   if sum(c for _, c in combo) <= budget)
        plan = baseline_plan("alds", tiny, infos, targets, reduction, total)
        errors = _plan_errors(tiny, plan)
        assert max(errors.values()) == pytest.approx(best, abs=1e-6)
        assert max_relative_error(tiny, plan) == pytest.approx(best, abs=1e-6)
        assert sum(layer_cost(tiny.get_submodule(n), infos[n].input_hw, s)[0] for n, s in plan.layers.items()) <= budget


def test_alds_beats_uniform_on_its_own_objective(resnet):
    model, infos, targets, total = resnet
    alds = baseline_plan("alds", model, infos, targets, 0.5, total)
    uniform = baseline_plan("uniform", model, infos, targets, 0.5, total, "kxk")
    alds_errors, uniform_errors = _plan_errors(model, alds), _plan_errors(model, uniform)
    assert max(alds_errors.values()) <= max(uniform_errors.values())
    for name, specs in alds.layers.items():
        if specs:
            kernel = tuple(model.get_submodule(name).weight.shape[2:])
            assert specs[0].first_kernel == kernel and specs[0].groups[1] == 1  # ALDS's form: grouped kxk, then 1x1


@pytest.mark.parametrize("method", ["alds", "fgroup"])
def test_params_objective_budget(resnet, method):
    import copy

    from svdnas.cost.counting import count_params

    model, infos, targets, _ = resnet
    total = count_params(model)
    plan = baseline_plan(method, model, infos, targets, 0.5, total, objective="params")
    achieved = 1 - count_params(apply_plan(copy.deepcopy(model), plan)) / total
    assert 0.5 <= achieved < 0.53


def test_fgroup_pattern_is_the_published_one():
    """ResNet-18 at ImageNet size: ranks 8/32/128 and groups = in_channels / rank on the 3x3 convs of
    stages 1-3, which SVD-NAS measured at FLOPs -42.31%, params -10.66% (its Table 1)."""
    import copy

    from svdnas.baselines.fgroup import fgroup_pattern
    from svdnas.cost.counting import count_params
    from svdnas.lowrank.plan import Plan

    model = create_model("resnet18_imagenet").eval()
    infos = trace_layers(model, example_input(model, (3, 224, 224)))
    targets, _ = select_targets(model, infos, "all-but-first")
    pattern = fgroup_pattern(model, infos, targets)
    convs3 = [n for n in targets if model.get_submodule(n).kernel_size == (3, 3)]
    assert [pattern[n].spec.rank for n in convs3[:12]] == [8] * 4 + [32] * 4 + [128] * 4
    for n in convs3[:12]:
        spec = pattern[n].spec
        assert spec.groups == (model.get_submodule(n).in_channels // spec.rank, 1) and spec.first_kernel == (3, 3)
    assert {pattern[n].stage for n in targets if n.startswith("layer4")} == {3}
    published = apply_plan(copy.deepcopy(model), Plan({n: [pattern[n].spec] for n in convs3[:12]}))
    assert 1 - count_params(published) / count_params(model) == pytest.approx(0.1066, abs=0.001)
    flops = 1 - model_macs(published, (3, 224, 224)) / model_macs(model, (3, 224, 224))
    assert flops == pytest.approx(0.4231, abs=0.003)


def test_fgroup_scales_the_pattern_by_one_factor(resnet):
    from svdnas.baselines.fgroup import fgroup_pattern
    from svdnas.lowrank.spec import family_max_rank

    model, infos, targets, total = resnet
    pattern = fgroup_pattern(model, infos, targets)
    for reduction in (0.4, 0.6):
        plan = baseline_plan("fgroup", model, infos, targets, reduction, total)
        assert all(not s for n, s in plan.layers.items() if n.startswith("layer4"))  # the last stage, as published
        assert plan.layers["layer1.0.conv1"][0].groups == (8, 1)
        lo, hi = 0.0, float("inf")  # the factors each layer's rounded rank allows
        for name, specs in plan.layers.items():
            if not specs:
                continue
            (spec,) = specs
            ref = pattern[name].spec
            assert spec.groups == ref.groups and spec.first_kernel == ref.first_kernel
            o, i, kh, kw = model.get_submodule(name).weight.shape
            if 1 < spec.rank < family_max_rank(spec, o, i, (kh, kw)):
                lo, hi = max(lo, (spec.rank - 0.5) / ref.rank), min(hi, (spec.rank + 0.5) / ref.rank)
        assert lo <= hi


def test_fgroup_compresses_the_last_stage_only_when_needed(resnet):
    model, infos, targets, total = resnet
    plan = baseline_plan("fgroup", model, infos, targets, 0.75, total)
    assert any(s for n, s in plan.layers.items() if n.startswith("layer4"))
    with pytest.raises(BudgetError, match="fgroup: rank 1 everywhere reaches"):
        baseline_plan("fgroup", model, infos, targets, 0.97, total)


@pytest.mark.parametrize("method", ["alds", "fgroup"])
def test_cli_runs_end_to_end(method, tiny_fmnist, tmp_path):
    import json

    import svdnas
    from tests.conftest import run_cli

    out = tmp_path / method
    r = run_cli("baseline", method, "zoo:resnet18", "--data", f"fmnist:{tiny_fmnist}", "--reduction", "0.5", "--out", out,
                "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["split"] == "kxk"
    assert report["flops"]["reduction"] >= 0.49
    layers = json.loads((out / "plan.json").read_text())["layers"]
    grouped = [b for layer in layers for b in layer["branches"] if b["groups"][0] > 1]
    assert grouped and all(b["groups"][1] == 1 for b in grouped)
    if method == "alds":
        assert 0 < report["method_choices"]["max_relative_error"] < 1
    loaded = svdnas.load(str(out)).eval()
    assert sum(p.numel() for p in loaded.parameters()) == report["params"]["compressed"]
    # the report's figures against the saved model: MACs counted on it, top-1 computed here
    from svdnas.cost.counting import model_macs
    from svdnas.data.datasets import load_data
    from svdnas.zoo import create_model

    macs = model_macs(loaded, (1, 28, 28)) / model_macs(create_model("resnet18"), (1, 28, 28))
    assert report["flops"]["reduction"] == pytest.approx(1 - macs, abs=1e-6)
    x, y = load_data(f"fmnist:{tiny_fmnist}").test.tensors
    with torch.no_grad():
        top1 = 100.0 * (loaded(x).argmax(1) == y).double().mean().item()
    assert report["top1"]["compressed"] == pytest.approx(top1, abs=1e-9)


def test_balf_keeps_the_most_energy_share_its_cost_allows():
    """BALF's Lagrangian rule against every rank combination of a three-layer model: no plan costing
    at most what BALF's costs keeps a larger sum of the layers' energy shares."""
    import itertools

    from svdnas.cost.counting import layer_cost, rank_cost
    from svdnas.lowrank import functional as LF
    from svdnas.lowrank.spec import LowRankSpec

    torch.manual_seed(3)
    # a rank costs four times more in the first layer (four times the positions) than in the others,
    # and the spectra differ in shape: the rule must trade energy share against cost
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3, stride=2, padding=1),
                                torch.nn.ReLU(), torch.nn.Conv2d(5, 6, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.logspace(0, -2, 5)[:, None, None, None])
    infos = trace_layers(model, example_input(model, (3, 16, 16)))
    targets = ["0", "2", "4"]
    total = model_macs(model, (3, 16, 16))
    shares, costs, cost0 = {}, {}, {}
    for n in targets:
        m = model.get_submodule(n)
        s2 = LF.svd(m.weight.detach(), (3, 3), (1, 1)).s[0].double() ** 2
        shares[n] = torch.cat([torch.zeros(1, dtype=torch.float64), s2.cumsum(0) / s2.sum()])
        base, unit = rank_cost(m, infos[n].input_hw, LowRankSpec((3, 3)), "flops")
        costs[n] = [base + unit * r for r in range(len(s2) + 1)]
        cost0[n] = float(layer_cost(m, infos[n].input_hw)[0])

    def value(ranks):  # a layer at a rank that costs at least the layer itself is left whole
        keep = [(shares[n][r], costs[n][r]) if costs[n][r] < cost0[n] else (1.0, cost0[n]) for n, r in zip(targets, ranks)]
        return float(sum(k for k, _ in keep)), sum(c for _, c in keep)

    checked = 0
    for reduction in (0.3, 0.5, 0.7):
        plan = baseline_plan("balf", model, infos, targets, reduction, total)
        ranks = [plan.layers[n][0].rank if plan.layers[n] else len(shares[n]) - 1 for n in targets]
        kept, spent = value(ranks)
        for combo in itertools.product(*[range(1, len(shares[n])) for n in targets]):
            v, c = value(combo)
            if c <= spent:
                assert v <= kept + 1e-9, (reduction, combo, ranks)
                checked += 1
    assert checked > 30


def test_balf_command_derives_whitened_factors_and_energy_takes_the_option(tiny_fmnist, tmp_path):
    import json

    from tests.conftest import run_cli

    args = ("zoo:resnet18", "--data", f"fmnist:{tiny_fmnist}", "--reduction", "0.5", "--device", "cpu", "--quiet",
            "--calibration-images", "64")
    r = run_cli("baseline", "balf", *args, "--out", tmp_path / "balf")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "balf" / "report.json").read_text())
    assert report["method"] == "balf" and report["split"] == "kxk" and report["derivation"] == "whitened"
    assert report["calibration"]["images"] == 64 and report["flops"]["reduction"] >= 0.49
    plans = {}
    for kind in ("weight", "whitened"):
        r = run_cli("baseline", "energy", *args, "--split", "kxk", "--derivation", kind, "--out", tmp_path / kind)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / kind / "report.json").read_text())["derivation"] == kind
        plans[kind] = json.loads((tmp_path / kind / "plan.json").read_text())["layers"]
    assert plans["weight"] != plans["whitened"]  # the whitened spectra move the energy rule's ranks
