import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from thop import profile
from torch import nn

from svdnas import LowRankSpec, decompose, layer_cost, model_macs
from svdnas.lowrank.space import groupings, kernel_splits
from svdnas.lowrank.spec import family_max_rank


def thop_macs(module: nn.Module, x: torch.Tensor) -> int:
    macs, _ = profile(module, inputs=(x,), verbose=False)
    return int(macs)


@st.composite
def layer_and_specs(draw):
    o = draw(st.sampled_from([2, 4, 6, 8, 12]))
    i = draw(st.sampled_from([1, 2, 3, 4, 8]))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    conv = nn.Conv2d(i, o, kernel, stride, padding, dilation, bias=draw(st.booleans()))
    specs = []
    for _ in range(draw(st.integers(1, 2))):
        first = draw(st.sampled_from(kernel_splits(kernel)))
        groups = draw(st.sampled_from(groupings(i, o)))
        spec = LowRankSpec(first, groups, 1)
        rank = draw(st.integers(1, family_max_rank(spec, o, i, kernel)))
        specs.append(spec.with_rank(rank))
    hw = (draw(st.integers(7, 16)), draw(st.integers(7, 16)))
    return conv, specs, hw


@settings(max_examples=60, deadline=None)
@given(layer_and_specs())
def test_layer_cost_matches_thop_and_real_params(case):
    conv, specs, hw = case
    x = torch.randn(1, conv.in_channels, *hw)
    block = decompose(conv, specs)
    macs, params = layer_cost(conv, hw, specs)
    assert macs == thop_macs(block, x)
    assert params == sum(p.numel() for p in block.parameters())
    macs0, params0 = layer_cost(conv, hw)
    assert macs0 == thop_macs(conv, x)
    assert params0 == sum(p.numel() for p in conv.parameters())


def test_cost_formula_by_hand():
    # 64->128, 3x3, stride 2 on 16x16 -> 8x8; (3,1)-first, groups on the second layer 4, rank 5.
    conv = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)
    macs, params = layer_cost(conv, (16, 16), [LowRankSpec((3, 1), (1, 4), 5)])
    width = 4 * 5
    first = 8 * 16 * width * 64 * 3  # first layer: stride 2 in h only, kernel (3, 1)
    second = 8 * 8 * 128 * (width // 4) * 3
    assert macs == first + second
    assert params == width * 64 * 3 + 128 * (width // 4) * 3


def test_linear_and_grouped_costs():
    lin = nn.Linear(32, 10)
    assert layer_cost(lin, (1, 1)) == (320, 330)
    assert layer_cost(lin, (1, 1), [LowRankSpec((1, 1), (1, 1), 4)]) == (32 * 4 + 4 * 10, 32 * 4 + 4 * 10 + 10)
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert layer_cost(dw, (5, 5)) == (5 * 5 * 8 * 9, 72)


def test_model_macs_counts_decomposed_model():
    from svdnas import Plan, apply_plan
    from tests.conftest import tiny_net

    model = tiny_net().eval()
    before = model_macs(model, (1, 28, 28))
    conv = model.body[0]
    spec = LowRankSpec((3, 1), (1, 1), 4)
    old, _ = layer_cost(conv, (28, 28))
    new, _ = layer_cost(conv, (28, 28), [spec])
    apply_plan(model, Plan({"body.0": [spec]}))
    assert model_macs(model, (1, 28, 28)) == before - old + new
