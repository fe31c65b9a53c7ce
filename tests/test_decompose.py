import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from svdnas import LowRankSpec, SpecError, decompose
from svdnas.lowrank.space import groupings, kernel_splits
from svdnas.lowrank.spec import family_max_rank

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def conv_and_family(draw):
    o = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12]))
    i = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 9]))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    conv = nn.Conv2d(i, o, kernel, stride, padding, dilation, bias=draw(st.booleans()), padding_mode=mode)
    first = draw(st.sampled_from(kernel_splits(kernel)))
    groups = draw(st.sampled_from(groupings(i, o)))
    return conv, first, groups


def _rel_err(block: nn.Module, conv: nn.Module, x: torch.Tensor) -> float:
    y = conv(x)
    return ((block(x) - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()


@SETTINGS
@given(conv_and_family(), st.integers(0, 2**31 - 1))
def test_full_rank_is_exact(case, seed):
    conv, first, groups = case
    torch.manual_seed(seed)
    spec = LowRankSpec(first, groups, 1)
    full = family_max_rank(spec, conv.out_channels, conv.in_channels, conv.kernel_size)
    block = decompose(conv, spec.with_rank(full))
    x = torch.randn(2, conv.in_channels, 13, 11)
    assert block(x).shape == conv(x).shape
    assert _rel_err(block, conv, x) < 1e-5


@SETTINGS
@given(conv_and_family(), st.integers(0, 2**31 - 1))
def test_residual_branch_makes_truncation_exact(case, seed):
    """A truncated first branch plus a full-rank second branch (any family) reproduces the conv."""
    conv, first, groups = case
    torch.manual_seed(seed)
    b1 = LowRankSpec(first, groups, 1)
    second_family = LowRankSpec(kernel_splits(tuple(conv.kernel_size))[-1], (1, 1), 1)
    full2 = family_max_rank(second_family, conv.out_channels, conv.in_channels, conv.kernel_size)
    block = decompose(conv, [b1, second_family.with_rank(full2)])
    assert _rel_err(block, conv, torch.randn(2, conv.in_channels, 12, 12)) < 1e-5


def test_error_falls_with_rank_and_second_branch_helps():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 8, 8)
    errs = [_rel_err(decompose(conv, LowRankSpec((3, 1), (1, 1), r)), conv, x) for r in (2, 8, 16, 32, 48)]
    assert all(a > b for a, b in itertools.pairwise(errs))
    one = _rel_err(decompose(conv, LowRankSpec((3, 1), (1, 1), 8)), conv, x)
    two = _rel_err(decompose(conv, [LowRankSpec((3, 1), (1, 1), 8), LowRankSpec((1, 3), (1, 1), 4)]), conv, x)
    assert two < one


def test_attributes_are_carried_over():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect").double()
    block = decompose(conv, LowRankSpec((1, 5), (2, 1), 3))
    first, second = block.branches[0].first, block.branches[0].second
    assert first.kernel_size == (1, 5) and second.kernel_size == (3, 1)
    assert first.stride == (1, 1) and second.stride == (2, 1)
    assert first.padding == (0, 2) and second.padding == (1, 0)
    assert first.dilation == (1, 2) and second.dilation == (1, 1)
    assert first.groups == 2 and second.groups == 1 and first.out_channels == 6
    assert first.padding_mode == second.padding_mode == "reflect"
    assert first.bias is None and second.bias is not None
    assert first.weight.dtype == torch.float64


def test_pointwise_stride_goes_to_first_layer():
    conv = nn.Conv2d(8, 16, 1, stride=2, bias=False)
    block = decompose(conv, LowRankSpec((1, 1), (1, 1), 4))
    assert block.branches[0].first.stride == (2, 2) and block.branches[0].second.stride == (1, 1)


def test_same_padding_string():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
    block = decompose(conv, LowRankSpec((3, 1), (1, 1), 12))
    assert _rel_err(block, conv, torch.randn(1, 4, 9, 9)) < 1e-5


def test_linear_full_rank_and_bias_once():
    torch.manual_seed(0)
    lin = nn.Linear(20, 7)
    block = decompose(lin, LowRankSpec((1, 1), (1, 1), 7))
    x = torch.randn(5, 3, 20)
    assert torch.allclose(block(x), lin(x), atol=1e-5)
    assert block.branches[0].first.bias is None
    with pytest.raises(SpecError, match="no groups"):
        decompose(lin, LowRankSpec((1, 1), (1, 7), 1))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LowRankSpec((2, 3), (1, 1), 1), "must be 1 or the kernel size 3"),
        (LowRankSpec((3, 3), (3, 1), 1), "do not divide the 8 input channels"),
        (LowRankSpec((3, 3), (1, 5), 1), "do not divide the 6 output channels"),
        (LowRankSpec((3, 3), (1, 1), 7), "above the maximum 6"),
    ],
)
def test_invalid_specs_name_the_rule(spec, message):
    with pytest.raises(SpecError, match=message):
        decompose(nn.Conv2d(8, 6, 3), spec)


@st.composite
def conv_and_broken_rule(draw):
    """A conv layer, a rule of the LR-space, and a spec (or spec arguments) breaking that rule,
    with the words the error must say."""
    o = draw(st.integers(1, 12))
    i = draw(st.integers(1, 12))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    conv = nn.Conv2d(i, o, kernel, bias=False)
    first = draw(st.sampled_from(kernel_splits(kernel)))
    rule = draw(st.sampled_from(["both-groups", "in-groups", "out-groups", "rank-not-positive", "rank-above", "kernel-split"]))
    if rule == "both-groups":
        g = (draw(st.integers(2, 8)), draw(st.integers(2, 8)))
        return conv, (first, g, 1), f"groups on both layers is not allowed (groups={g})"
    if rule == "in-groups":
        g = draw(st.integers(2, 16).filter(lambda g: i % g))
        return conv, (first, (g, 1), 1), f"first-layer groups {g} do not divide the {i} input channels"
    if rule == "out-groups":
        g = draw(st.integers(2, 16).filter(lambda g: o % g))
        return conv, (first, (1, g), 1), f"second-layer groups {g} do not divide the {o} output channels"
    if rule == "rank-not-positive":
        rank = draw(st.one_of(st.integers(-3, 0), st.just(1.5)))
        return conv, (first, (1, 1), rank), f"rank must be a positive int, got {rank!r}"
    if rule == "rank-above":
        spec = LowRankSpec(first, (1, 1), 1)
        top = family_max_rank(spec, o, i, kernel)
        rank = top + draw(st.integers(1, 10))
        return conv, (first, (1, 1), rank), f"rank {rank} is above the maximum {top}"
    d = draw(st.integers(0, 1))
    bad = draw(st.integers(2, 7).filter(lambda a: a != kernel[d]))
    split = tuple(bad if j == d else first[j] for j in range(2))
    return conv, (split, (1, 1), 1), f"first_kernel[{d}]={bad} must be 1 or the kernel size {kernel[d]}"


@SETTINGS
@given(conv_and_broken_rule())
def test_invalid_specs_raise_value_error_naming_the_rule(case):
    """Whether the spec itself is malformed or does not fit the layer, decompose and layer_cost
    refuse it with a ValueError saying which rule it breaks."""
    from svdnas.cost.counting import layer_cost

    conv, (first, groups, rank), message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        decompose(conv, LowRankSpec(first, groups, rank))
    with pytest.raises(ValueError, match=re.escape(message)):
        layer_cost(conv, (8, 8), [LowRankSpec(first, groups, rank)])


def test_spec_rules():
    with pytest.raises(ValueError, match="both layers"):
        LowRankSpec((1, 1), (2, 2), 1)
    with pytest.raises(ValueError, match="rank must be a positive"):
        LowRankSpec((1, 1), (1, 1), 0)
    with pytest.raises(SpecError, match="depthwise"):
        decompose(nn.Conv2d(4, 4, 3, groups=4), LowRankSpec((3, 3), (1, 1), 1))
    with pytest.raises(SpecError, match="only nn.Conv2d"):
        decompose(nn.Conv1d(4, 4, 3), LowRankSpec((3, 3), (1, 1), 1))
    assert LowRankSpec.from_dict(LowRankSpec((1, 3), (1, 2), 5).to_dict()) == LowRankSpec((1, 3), (1, 2), 5)


def test_the_top_level_api_takes_the_contracts_names():
    """The public functions answer to the parameter names the interface gives them (``conv``), and the
    command line's loaders are at the top level too."""
    import svdnas

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    full = family_max_rank(svdnas.LowRankSpec((3, 1), (1, 1), 1), 6, 8, (3, 3))
    specs = [svdnas.LowRankSpec(first_kernel=(3, 1), groups=(1, 1), rank=full)]
    block = svdnas.decompose(conv=conv, specs=specs)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv(x), rtol=1e-4, atol=1e-5)
    assert svdnas.layer_cost(conv=conv, input_hw=(5, 5), specs=specs) == svdnas.layer_cost(conv, (5, 5), specs)
    assert svdnas.layer_cost(conv=conv, input_hw=(5, 5)) == (8 * 6 * 9 * 25, 8 * 6 * 9 + 6)
    model, info = svdnas.load_model("zoo:resnet18")
    assert isinstance(model, nn.Module) and info.input_shape == (1, 28, 28)
    assert callable(svdnas.load_data) and svdnas.DataBundle.__name__ == "DataBundle"
