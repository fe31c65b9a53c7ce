"""Ranks in whole channel blocks: the rule, the grid, the pipeline, and what ONNX Runtime does with them."""

import pytest
import torch
from torch import nn

from svdnas import LowRankSpec, decompose
from svdnas.cost.onnx import reorder_nodes
from svdnas.cost.timer import channel_block, onnxruntime_available
from svdnas.data.datasets import load_data
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import fraction_grid, grid_candidates
from svdnas.search.candidates import blocked


@pytest.mark.parametrize(("spec", "ok"), [
    (LowRankSpec((3, 1), (1, 1), 16), True),
    (LowRankSpec((3, 1), (1, 1), 32), True),
    (LowRankSpec((3, 1), (1, 1), 12), False),  # a middle of 12 channels: not a whole block
    (LowRankSpec((3, 3), (4, 1), 16), True),  # 64 / 4 = 16 input channels per group, rank 16
    (LowRankSpec((3, 3), (8, 1), 16), False),  # 8 input channels per group
    (LowRankSpec((3, 3), (64, 1), 1), True),  # depthwise first layer
    (LowRankSpec((3, 3), (64, 1), 2), False),
    (LowRankSpec((1, 1), (1, 4), 16), True),  # 64 / 4 = 16 output channels per group
    (LowRankSpec((1, 1), (1, 8), 16), False),
])
def test_a_block_keeps_whole_channel_blocks_per_group(spec, ok):
    assert blocked(spec, 64, 64, 16) is ok
    assert blocked(spec, 64, 64, 1)  # no multiple: anything goes


def test_the_grid_rounds_ranks_to_the_multiple_and_offers_only_blocked_candidates():
    layer = nn.Conv2d(64, 64, 3, padding=1)
    fractions = fraction_grid(0.1, 0.9, 0.05)
    plain = grid_candidates("x", layer, (14, 14), fractions)
    rounded = grid_candidates("x", layer, (14, 14), fractions, rank_multiple=16)
    assert any(s.rank % 16 for s in plain.specs)
    assert rounded.specs and all(s.rank % 16 == 0 or s.groups[0] == 64 for s in rounded.specs)
    assert all(blocked(s, 64, 64, 16) for s in rounded.specs)
    families = {s.family() for s in rounded.specs}
    assert families <= {s.family() for s in plain.specs}
    assert {((3, 1), (1, 1)), ((1, 3), (1, 1)), ((1, 1), (1, 1)), ((3, 3), (1, 1))} <= families  # the ungrouped splits stay
    assert ((3, 3), (8, 1)) not in families  # 8 input channels per group: not a whole block
    assert grid_candidates("x", layer, (14, 14), fractions, rank_multiple=1).specs == plain.specs


@pytest.mark.skipif(not onnxruntime_available() or channel_block() == 1, reason="needs ONNX Runtime on a CPU with blocked kernels")
def test_onnx_runtime_runs_every_offered_candidate_in_its_blocked_layout():
    torch.manual_seed(0)
    block = channel_block()
    layer = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 14, 14)

    def between(middle: nn.Module) -> nn.Module:  # blocked convolutions on both sides, as inside a network
        return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), middle, nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()

    baseline = reorder_nodes(between(layer), x)  # into and out of the blocked layout once
    offered = grid_candidates("x", layer, (14, 14), fraction_grid(0.1, 0.9, 0.1), rank_multiple=block).specs
    assert offered
    for spec in offered:
        assert reorder_nodes(between(decompose(layer, [spec])), x) == baseline, spec
    odd = LowRankSpec((3, 1), (1, 1), block // 2 + 1)
    assert not blocked(odd, 64, 64, block) and reorder_nodes(between(decompose(layer, [odd])), x) > baseline


def test_a_depthwise_first_layer_of_rank_one_is_offered_as_it_is():
    layer = nn.Conv2d(64, 64, 3, padding=1)
    rounded = grid_candidates("x", layer, (14, 14), fraction_grid(0.05, 0.9, 0.05), rank_multiple=16)
    depthwise = [s for s in rounded.specs if s.groups[0] == 64]
    assert depthwise and all(s.rank == 1 for s in depthwise)


class Wide(nn.Module):
    """Layers of whole blocks (``a``), of a width that is not (``b``: 24 out), and of whole blocks
    without a blocked candidate on the grid (``c``: a 1x1 whose rank-16 block costs as much as it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 1)
        self.b = nn.Conv2d(32, 24, 3, stride=2, padding=1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.b(x)).mean((2, 3)))


def test_the_default_multiple_follows_the_device_and_leaves_no_layer_without_candidates(tiny_fmnist, monkeypatch):
    monkeypatch.setattr("svdnas.pipeline.stages.channel_block", lambda device="cpu": 16)
    torch.manual_seed(0)
    data = load_data(f"fmnist:{tiny_fmnist}")
    config = CompressConfig(reduction=0.4, search_images=200, proxy_images=64, proxy_drop=0, derivation="weight")
    config.search.epochs = 1
    result = compress(Wide().eval(), data, config, filter_fn="convs")
    assert result.report["rank_multiple"] == 16
    plan = result.plan.compressed()
    assert "a" in plan and all(s.rank % 16 == 0 for s in plan["a"])  # whole blocks where the layer's channels are
    offered = {e["name"]: e["candidates"] for e in result.report["layers"]}
    assert offered["c"] > 0 and offered["b"] > 0  # no blocked candidate for c, not whole blocks for b: the plain grid
    assert all(s.rank % 16 for s in plan.get("c", []))  # c's are the plain grid's (no rank of 16 is cheaper than c)
    config = CompressConfig(reduction=0.4, search_images=200, proxy_images=64, proxy_drop=0, derivation="weight", rank_multiple=1)
    config.search.epochs = 1
    explicit = compress(Wide().eval(), data, config, filter_fn="convs")
    assert explicit.report["rank_multiple"] == 1


def test_the_channel_block_of_a_gpu_asks_for_no_rounding():
    assert channel_block("cuda") == 1
    assert channel_block("cpu") in (1, 8, 16)


def test_the_rank_multiple_is_checked():
    from svdnas.errors import SpecError

    with pytest.raises(SpecError, match="--rank-multiple must be positive"):
        CompressConfig(reduction=0.3, rank_multiple=0)
