import pytest
import torch
from torch import nn

from svdnas import LowRankSpec, decompose
from svdnas.search import MixedLayer, fraction_grid, grid_candidates, select_within_budget, window_dtype
from svdnas.search.supernet import native_bfloat16


def _candidates(layer, hw=(8, 8), prefix=()):
    return grid_candidates("x", layer, hw, fraction_grid(0.1, 0.9, 0.1), prefix=prefix)


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(6, 8, (1, 3), stride=2), nn.Conv2d(8, 16, 1), nn.Linear(10, 6)])
def test_one_hot_mixture_is_each_candidate(layer):
    torch.manual_seed(0)
    cands = _candidates(layer)
    mixed = MixedLayer(layer, cands)
    x = torch.randn(2, 10) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 8, 8)
    for i in range(len(cands)):
        w = torch.zeros(len(cands))
        w[i] = 1.0
        got = mixed._apply_weight(x, mixed.mixed_weight(w))
        expected = layer(x) if i == 0 else decompose(layer, [cands.specs[i - 1]])(x)
        assert torch.allclose(got, expected, atol=1e-5), (i, cands.specs[i - 1] if i else "original")


def test_soft_mixture_is_weighted_sum_of_outputs():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1)
    cands = _candidates(layer)
    mixed = MixedLayer(layer, cands)
    x = torch.randn(2, 8, 8, 8)
    w = torch.softmax(torch.randn(len(cands)), 0)
    expected = w[0] * layer(x)
    for i, spec in enumerate(cands.specs, start=1):
        expected = expected + w[i] * decompose(layer, [spec])(x)
    assert torch.allclose(mixed._apply_weight(x, mixed.mixed_weight(w)), expected, atol=1e-5)


def test_second_branch_candidates_add_to_the_fixed_prefix():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    prefix = [LowRankSpec((3, 1), (1, 1), 4)]
    cands = _candidates(layer, prefix=prefix)
    mixed = MixedLayer(layer, cands)
    x = torch.randn(1, 8, 8, 8)
    w = torch.zeros(len(cands))
    w[3] = 1.0
    expected = decompose(layer, prefix + [cands.specs[2]])(x)
    assert torch.allclose(mixed._apply_weight(x, mixed.mixed_weight(w)), expected, atol=1e-5)
    assert cands.macs[3] > cands.macs[0] * 0 and cands.specs[2].rank >= 1


def test_grid_ranks_follow_the_fractions():
    layer = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    cands = grid_candidates("x", layer, (8, 8), [0.25, 0.5])
    for spec, macs in zip(cands.specs, cands.macs[1:]):
        assert macs <= 0.5 * cands.macs[0]
        assert macs > 0.25 * cands.macs[0] - macs / spec.rank - 1  # within one rank of a grid point


def test_selection_meets_budget_and_matches_brute_force():
    import itertools

    from svdnas.errors import BudgetError

    g = torch.Generator().manual_seed(0)
    optimal = feasible = 0
    for _ in range(200):
        scores = [torch.rand(4, generator=g).tolist() for _ in range(4)]
        costs = [sorted(torch.rand(4, generator=g).tolist(), reverse=True) for _ in range(4)]
        budget = 0.5 * sum(c[0] for c in costs)
        options = [ch for ch in itertools.product(range(4), repeat=4) if sum(c[i] for c, i in zip(costs, ch)) <= budget]
        if not options:
            with pytest.raises(BudgetError):
                select_within_budget(scores, costs, budget)
            continue
        feasible += 1
        choice = select_within_budget(scores, costs, budget)
        assert sum(c[i] for c, i in zip(costs, choice)) <= budget + 1e-9
        best = max(sum(s[i] for s, i in zip(scores, ch)) for ch in options)
        got = sum(s[i] for s, i in zip(scores, choice))
        assert got <= best + 1e-9
        optimal += got >= best - 1e-9
    assert feasible > 150 and optimal >= 0.97 * feasible  # exact but for costs within one grid step of the budget


def test_upgrades_spend_the_slack_along_family_ranks():
    scores = [[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]]  # the logits like the cheapest candidate
    costs = [[10.0, 2.0, 6.0], [10.0, 2.0, 6.0]]
    upgrades = [[None, 2, 0], [None, 2, 0]]  # 1 -> 2 -> original
    assert select_within_budget(scores, costs, 8.0) == [1, 1]
    assert sorted(select_within_budget(scores, costs, 8.0, upgrades=upgrades)) == [1, 2]
    assert select_within_budget(scores, costs, 20.0, upgrades=upgrades) == [0, 0]


@pytest.mark.parametrize("sampling", ["mixed", "two"])
def test_super_block_moves_with_the_model(sampling):
    """Every tensor a super block uses is a buffer, so .to() (here: to float64) carries it along."""
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1)
    mixed = MixedLayer(layer, _candidates(layer), sampling).double()
    out = mixed(torch.randn(2, 8, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert mixed.candidate_weight(len(mixed.candidates) - 1).dtype == torch.float64
    if sampling == "two":  # runs the candidates' own weights: nothing held for mixing them
        assert all(f.us_window is None for f in mixed.families) and mixed.stack.shape[0] == 1
        with pytest.raises(RuntimeError, match="holds no mixed weight"):
            mixed.mixed_weight(torch.ones(len(mixed.candidates)))


def _explicit_mixture(mixed, w):
    """``sum_c w_c * weight_c`` from every candidate's own dense weight."""
    return sum(w[i] * mixed.candidate_weight(i) for i in range(len(w)))


@pytest.mark.parametrize("prefix", [(), (LowRankSpec((3, 1), (1, 1), 3),)])
def test_mixed_weight_and_its_gradient_match_the_explicit_mixture(prefix):
    """float32 windows: the mixed weight and the gradient of the candidate weights are those of the
    sum over every candidate's dense weight; bfloat16 windows: within bfloat16's rounding (a few 1e-3
    of the norm), while each candidate's own weight stays exact."""
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 24, 3, padding=1)
    cands = _candidates(layer, prefix=prefix)
    exact = MixedLayer(layer, cands, window_dtype=torch.float32)
    half = MixedLayer(layer, cands, window_dtype=torch.bfloat16)
    assert all(f.us_window.dtype == torch.bfloat16 for f in half.families) and len(half.families) > 1
    g = torch.randn(exact.weight.shape)
    for tau in (5.0, 0.3):
        w = torch.nn.functional.gumbel_softmax(torch.randn(len(cands)), tau=tau)
        wx = w.clone().requires_grad_(True)
        ref, = torch.autograd.grad((_explicit_mixture(exact, wx) * g).sum(), wx)
        target = _explicit_mixture(exact, w)
        for mixed, tol in ((exact, 1e-5), (half, 1e-2)):
            wv = w.clone().requires_grad_(True)
            got = mixed.mixed_weight(wv)
            grad, = torch.autograd.grad((got * g).sum(), wv)
            assert (got - target).norm() <= tol * target.norm(), (mixed.window_dtype, tau)
            assert (grad - ref).norm() <= tol * ref.norm(), (mixed.window_dtype, tau)
        assert (half.mixed_weight(w) - target).norm() > 0  # the bfloat16 path did run
    for i in range(len(cands)):
        assert torch.equal(half.candidate_weight(i), exact.candidate_weight(i))


def test_window_dtype_resolution():
    assert window_dtype("float32", "cpu") == torch.float32
    assert window_dtype("bfloat16", "cpu") == torch.bfloat16
    assert window_dtype("auto", "cpu") == (torch.bfloat16 if native_bfloat16("cpu") else torch.float32)
    assert window_dtype("auto", "meta") == torch.float32
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        window_dtype("float16", "cpu")
