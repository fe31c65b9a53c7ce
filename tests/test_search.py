import pytest
import torch
from torch import nn

from svdnas import LowRankSpec, decompose
from svdnas.search import MixedLayer, fraction_grid, grid_candidates, select_within_budget, window_dtype
from svdnas.search.supernet import native_bfloat16


def _counted_macs(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of one input through every Conv2d of ``module``, counted on the outputs it produces."""
    total = 0

    def hook(conv, _, out):
        nonlocal total
        total += out[0].numel() * conv.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


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
    # the cost of a second-branch candidate is that of the whole layer it builds, prefix included
    assert cands.macs[3] == _counted_macs(decompose(layer, prefix + [cands.specs[2]]), x) > _counted_macs(decompose(layer, prefix), x)
    assert cands.macs[0] == _counted_macs(layer, x)


def test_grid_ranks_follow_the_fractions():
    layer = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    cands = grid_candidates("x", layer, (8, 8), [0.25, 0.5])
    for spec, macs in zip(cands.specs, cands.macs[1:]):
        assert macs <= 0.5 * cands.macs[0]
        assert macs > 0.25 * cands.macs[0] - macs / spec.rank - 1  # within one rank of a grid point


def _brute_force(scores, costs, room, bins):
    """Every combination of one candidate per layer: the best summed score among those whose costs,
    rounded up to ``room / bins`` as select_within_budget documents, fit; and the best among those
    whose exact costs fit."""
    import itertools
    import math

    unit = room / bins
    best_rounded = best_exact = -math.inf
    for choice in itertools.product(*(range(len(s)) for s in scores)):
        score = sum(s[c] for s, c in zip(scores, choice))
        if sum(k[c] for k, c in zip(costs, choice)) <= room:
            best_exact = max(best_exact, score)
        if sum(math.ceil(k[c] / unit - 1e-9) for k, c in zip(costs, choice)) <= bins:
            best_rounded = max(best_rounded, score)
    return best_rounded, best_exact


@pytest.mark.parametrize("bins", [4000, 12])  # the default grid, and a coarse one where rounding decides
def test_selection_is_the_brute_force_optimum_of_the_rounded_costs(bins):
    """select_within_budget against every combination of 3-4 layers x 2-4 candidates: within the
    budget always, and exactly the best score the costs rounded up to the grid allow (no better:
    that would need a cost the grid does not hold; no worse: the DP would have missed one)."""
    from svdnas.errors import BudgetError

    g = torch.Generator().manual_seed(0)
    infeasible = missed_by_rounding = 0
    for trial in range(300):
        layers = 3 + trial % 2
        scores = [torch.randn(int(torch.randint(2, 5, (1,), generator=g)), generator=g).tolist() for _ in range(layers)]
        costs = [(torch.rand(len(s), generator=g) * 10).tolist() for s in scores]
        fixed = float(torch.rand(1, generator=g)) * 5 if trial % 3 == 0 else 0.0
        budget = fixed + float(torch.rand(1, generator=g)) * sum(max(k) for k in costs)
        best_rounded, best_exact = _brute_force(scores, costs, budget - fixed, bins)
        if best_exact == -float("inf"):
            infeasible += 1
            with pytest.raises(BudgetError):
                select_within_budget(scores, costs, budget, fixed=fixed, bins=bins)
            continue
        if best_rounded == -float("inf"):  # fits exactly, not once rounded up: an error or a fitting choice
            missed_by_rounding += 1
            try:
                choice = select_within_budget(scores, costs, budget, fixed=fixed, bins=bins)
            except BudgetError:
                continue
        else:
            choice = select_within_budget(scores, costs, budget, fixed=fixed, bins=bins)
        assert len(choice) == layers and all(0 <= c < len(s) for c, s in zip(choice, scores))
        assert fixed + sum(k[c] for k, c in zip(costs, choice)) <= budget + 1e-9
        got = sum(s[c] for s, c in zip(scores, choice))
        assert got <= best_exact + 1e-9
        if best_rounded > -float("inf"):
            assert got == pytest.approx(best_rounded, abs=1e-9), (trial, choice)
    assert 10 < infeasible < 150  # both outcomes were exercised
    if bins == 4000:
        assert missed_by_rounding <= 3  # a fine grid loses almost nothing to rounding


def test_selection_upgrades_fit_and_leave_no_affordable_upgrade():
    """With upgrades: still within the budget, and the loop stops only when no upgrade fits the slack;
    each layer's choice is its DP choice or a candidate up its upgrade chain."""
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        scores = [torch.randn(4, generator=g).tolist() for _ in range(3)]
        costs = [sorted((torch.rand(4, generator=g) * 10).tolist()) for _ in range(3)]
        upgrades = [[1, 2, 3, None] for _ in range(3)]  # each candidate's next rank is the next costlier one
        budget = sum(k[0] for k in costs) + float(torch.rand(1, generator=g)) * 10
        plain = select_within_budget(scores, costs, budget)
        choice = select_within_budget(scores, costs, budget, upgrades=upgrades)
        slack = budget - sum(k[c] for k, c in zip(costs, choice))
        assert slack >= -1e-9 and all(c >= p for c, p in zip(choice, plain))
        assert all(c == 3 or costs[i][c + 1] - costs[i][c] > slack for i, c in enumerate(choice))


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


def test_the_stopping_rule_needs_a_stable_plan_and_a_settled_multiplier():
    from svdnas.search.loop import SearchHistory, settled

    h = SearchHistory(multiplier=[0.1, 0.5, 1.0, 1.05, 1.1], selection=[[1, 2], [2, 2], [2, 3], [2, 3], [2, 3]])
    assert settled(h, 2, 0.2)  # the last three epochs: the same plan, the multiplier within 10%
    assert not settled(h, 3, 0.2)  # epoch 2's plan differs
    assert not settled(h, 2, 0.05)  # the multiplier moved 10% of its value
    assert not settled(h, 0, 0.2)  # patience 0: never
    h.selection[-1] = [3, 3]
    assert not settled(h, 1, 0.2)


def test_a_search_stops_when_its_plan_has_settled_and_says_why(trained_tiny):
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.search import SearchConfig

    model, data = trained_tiny

    def run(patience):
        config = CompressConfig(reduction=0.3, search_images=64, proxy_images=32, families=2, proxy_drop=0, derivation="weight",
                                search=SearchConfig(epochs=12, target=0.5, patience=patience, settle=10.0))
        return compress(model, data, config, filter_fn="convs", seed=0)

    full, short = run(0), run(2)
    assert full.history["stopped"] == "epochs" and len(full.history["epoch"]) == 12
    assert short.history["stopped"] == "stable" and len(short.history["epoch"]) < 12
    k = len(short.history["epoch"])
    assert short.history["selection"][-3:] == [short.history["selection"][-1]] * 3
    assert short.history["selection"] == full.history["selection"][:k]  # the same search, cut short
    assert short.report["search"]["stopped"] == {"reason": "stable", "epochs": k, "of": 12}
