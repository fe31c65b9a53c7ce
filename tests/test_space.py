import pytest
from torch import nn

from svdnas import LowRankSpec, count_space, enumerate_space
from svdnas.lowrank.decompose import empty_block
from svdnas.lowrank.space import divisors, groupings, kernel_splits


def test_splits_and_groupings():
    assert kernel_splits((3, 3)) == [(1, 1), (1, 3), (3, 1), (3, 3)]
    assert kernel_splits((1, 1)) == [(1, 1)]
    assert kernel_splits((1, 5)) == [(1, 1), (1, 5)]
    assert groupings(4, 6) == [(1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (1, 6)]
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


@pytest.mark.parametrize("shape", [(8, 8, 3, 3), (16, 8, 3, 3), (12, 6, 1, 1), (6, 4, 5, 3)])
def test_space_is_every_valid_spec_below_original_params(shape):
    """Brute force: every (split, grouping, rank) whose module builds and holds fewer weights than the
    layer, the weights counted on the built module (not by the cost formulas the space uses)."""
    o, i, kh, kw = shape
    conv = nn.Conv2d(i, o, (kh, kw), bias=False)
    original = o * i * kh * kw
    expected = set()
    for a in kernel_splits((kh, kw)):  # the splits and groupings are checked by hand above
        for g in groupings(i, o):
            for r in range(1, 200):
                try:
                    block = empty_block(conv, [LowRankSpec(a, g, r)])
                except ValueError:  # rank above the family's maximum
                    break
                if sum(p.numel() for p in block.parameters()) < original:
                    expected.add(LowRankSpec(a, g, r))
            else:
                raise AssertionError(f"no rank limit found for {a}, {g}")
    got = list(enumerate_space(conv))
    assert len(got) == len(set(got)) == count_space(conv)
    assert set(got) == expected


def test_512_layer_count_is_stable():
    # Documented in docs/design-space.md beside the paper's 74,902.
    assert count_space(nn.Conv2d(512, 512, 3, padding=1, bias=False)) == 11006
