import pytest
import torch

from svdnas.baselines import METHODS, SPLITS, baseline_plan, run_baseline, split_kernel
from svdnas.cost import model_macs
from svdnas.errors import BudgetError, SpecError
from svdnas.surgery import apply_plan, example_input, select_targets, trace_layers
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
    from svdnas.data import load_data
    from tests.conftest import tiny_net

    data = load_data(f"fmnist:{tiny_fmnist}")
    _, _, report = run_baseline("energy", tiny_net(), data, 0.5, filter_fn="convs", split="best", search_images=100)
    tried = report["split_search"]["top1_on_search_images"]
    assert set(tried) == set(SPLITS)
    assert tried[report["split"]] == max(tried.values())
    assert report["flops"]["reduction"] >= 0.49
