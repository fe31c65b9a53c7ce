import json
import math

import pytest
import torch
from torch import nn

from svdnas import LowRankSpec
from svdnas.cost import table as lt
from svdnas.cost.table import LatencyConfig, LatencyTable, default_cache_path, layer_key, spec_key
from svdnas.cost.timer import onnxruntime_available
from svdnas.data.datasets import load_data
from svdnas.errors import BudgetError, SpecError
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.report.markdown import markdown
from svdnas.search import SearchConfig, fraction_grid, grid_candidates
from svdnas.search.latency_costs import attach_latency
from svdnas.surgery.trace import trace_layers
from tests.conftest import tiny_net


class FakeTimer:
    """Stands in for ``time_modules``: a deterministic time per module (0.01 ms per 1,000
    parameters and 0.0001 ms per weight layer), counting the modules it is asked to time."""

    def __init__(self) -> None:
        self.calls = 0
        self.engines: set[str] = set()

    @staticmethod
    def ms(module: nn.Module) -> float:
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())
        return 1e-5 * sum(p.numel() for p in module.parameters()) + 1e-4 * layers

    def __call__(self, modules, x, warmup, repeats, min_sample_ms=0.5, engine="pytorch", threads=None):
        self.engines.add(engine)
        self.calls += len(modules)
        return [{"median_ms": self.ms(m), "p10_ms": self.ms(m), "p90_ms": self.ms(m), "repeats": repeats} for m in modules]


@pytest.fixture
def fake_timer(monkeypatch):
    timer = FakeTimer()
    monkeypatch.setattr(lt, "time_modules", timer)
    return timer


def _variants(layer, hw=(8, 8)):
    cands = grid_candidates("x", layer, hw, fraction_grid(0.1, 0.9, 0.1))
    return [[]] + [[s] for s in cands.specs]


def test_second_table_on_the_same_file_measures_nothing(fake_timer, tmp_path):
    layer = nn.Conv2d(8, 16, 3, padding=1)
    variants = _variants(layer)
    cache = tmp_path / "lut.json"
    first = LatencyTable("cpu", LatencyConfig(cache=str(cache)))
    times = first.candidates(layer, (8, 8), variants)
    first.save()
    assert first.measured == fake_timer.calls > 0
    stored = json.loads(cache.read_text())
    assert stored["device"] == "cpu" and stored["threads"] == torch.get_num_threads() and len(stored["entries"]) == first.measured
    fake_timer.calls = 0
    second = LatencyTable("cpu", LatencyConfig(cache=str(cache)))
    assert second.candidates(layer, (8, 8), variants) == times
    assert fake_timer.calls == 0 and second.measured == 0 and second.summary()["entries"] == first.summary()["entries"]


def test_default_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDNAS_CACHE", str(tmp_path))
    assert LatencyTable("cpu", LatencyConfig(threads=3)).path == tmp_path / "latency-cpu-3.json"
    assert LatencyTable("cpu", LatencyConfig(cache="")).path is None


def test_a_cache_of_another_torch_is_measured_again(fake_timer, tmp_path):
    layer = nn.Conv2d(4, 4, 3)
    cache = tmp_path / "lut.json"
    table = LatencyTable("cpu", LatencyConfig(cache=str(cache)))
    table.layer(layer, (6, 6))
    table.save()
    data = json.loads(cache.read_text())
    cache.write_text(json.dumps(data | {"torch": "0.0.1"}))
    again = LatencyTable("cpu", LatencyConfig(cache=str(cache)))
    again.layer(layer, (6, 6))
    assert again.measured == 1 and fake_timer.calls == 2


BASE = {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "stride": 1, "padding": 1, "dilation": 1}


@pytest.mark.parametrize(
    ("change", "hw", "batch"),
    [({"in_channels": 4}, (8, 8), 1), ({"out_channels": 8}, (8, 8), 1), ({"kernel_size": 1, "padding": 0}, (8, 8), 1),
     ({"stride": 2}, (8, 8), 1), ({"padding": 2}, (8, 8), 1), ({"dilation": 2, "padding": 2}, (8, 8), 1),
     ({}, (8, 6), 1), ({}, (8, 8), 4)],
)
def test_keys_differ_for_every_shape_that_changes_timing(fake_timer, change, hw, batch):
    base = nn.Conv2d(**BASE)
    other = nn.Conv2d(**(BASE | change))
    assert layer_key(other, hw, batch) != layer_key(base, (8, 8), 1)
    table = LatencyTable("cpu", LatencyConfig(cache=""))
    table.layer(base, (8, 8))
    table.config.batch = batch
    table.layer(other, hw)
    assert table.measured == 2  # not answered by the first entry


def test_keys_name_the_candidate():
    a, b = LowRankSpec((3, 1), (1, 1), 4), LowRankSpec((3, 1), (1, 1), 5)
    keys = {spec_key([]), spec_key([a]), spec_key([b]), spec_key([LowRankSpec((3, 1), (2, 1), 4)]), spec_key([a, b])}
    assert len(keys) == 5
    assert layer_key(nn.Linear(8, 4), (1, 1), 1) != layer_key(nn.Linear(8, 4, bias=False), (1, 1), 1)


def test_anchors_interpolate_what_they_do_not_measure(fake_timer):
    # the fake time is linear in rank within a family, so interpolation must be exact
    layer = nn.Conv2d(16, 16, 3, padding=1)
    variants = _variants(layer)
    exact = LatencyTable("cpu", LatencyConfig(cache="", anchors=0))
    sparse = LatencyTable("cpu", LatencyConfig(cache="", anchors=4))
    want = exact.candidates(layer, (8, 8), variants)
    got = sparse.candidates(layer, (8, 8), variants)
    assert got == pytest.approx(want, rel=1e-9)
    assert exact.measured == len(variants) and sparse.measured < exact.measured
    assert want[0] == pytest.approx(FakeTimer.ms(layer))


def test_blocks_built_for_timing_have_the_decomposed_structure():
    layer = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    specs = [LowRankSpec((3, 1), (2, 1), 3)]
    built = lt._build(layer, specs, torch.device("cpu"))
    from svdnas import decompose

    real = decompose(layer, specs)
    x = torch.randn(1, 8, 9, 9)
    assert [p.shape for p in built.parameters()] == [p.shape for p in real.parameters()]
    assert built(x).shape == real(x).shape and torch.isfinite(built(x)).all()


def test_real_timing_of_a_tiny_layer():
    table = LatencyTable("cpu", LatencyConfig(cache="", warmup=1, repeats=3))
    ms = table.candidates(nn.Conv2d(4, 8, 3, padding=1), (8, 8), [[], [LowRankSpec((3, 1), (1, 1), 2)]])
    assert all(math.isfinite(t) and 0 < t < 1000 for t in ms)
    assert table.measured == 2 and table.seconds > 0


def test_bad_latency_settings():
    with pytest.raises(SpecError, match="latency-batch"):
        LatencyConfig(batch=0)
    with pytest.raises(SpecError, match="anchors"):
        LatencyConfig(anchors=1)


@pytest.mark.parametrize("branches", [1, 2])
def test_compress_meets_a_latency_budget(fake_timer, tiny_fmnist, tmp_path, branches, caplog):
    data = load_data(f"fmnist:{tiny_fmnist}")
    config = CompressConfig(
        reduction=0.4, objective="latency", latency=LatencyConfig(cache=str(tmp_path / "lut.json")), branches=branches,
        search_images=200, proxy_images=64, search=SearchConfig(epochs=2, batch_size=64, target=0.5),
        # whitened: the prefix fit gives a bias-less layer a bias, which this fake timer would count as time
        derivation="whitened",
    )
    result = compress(tiny_net().eval(), data, config, filter_fn="convs+linear", out=tmp_path / "run")
    lat = json.loads((tmp_path / "run" / "report.json").read_text())["latency"]
    assert result.report["objective"] == "latency"
    assert lat["predicted"]["reduction"] >= 0.4 - 0.01
    assert lat["predicted"]["original_ms"] == pytest.approx(FakeTimer.ms(tiny_net()))  # the measured whole model
    assert lat["predicted"]["compressed_ms"] == pytest.approx(FakeTimer.ms(result.model), rel=1e-6)  # the fake is additive
    assert math.isfinite(lat["reduction"]) and lat["original_ms"] > 0 and lat["batch"] == 1  # measured end to end
    assert lat["predicted"]["table"]["measured"] == fake_timer.calls - 1  # all but the whole model
    assert 0 < result.report["seconds"]["latency_table"] <= result.report["seconds"]["total"]
    assert "the lookup table predicted" in markdown(result.report)
    entries = json.loads((tmp_path / "lut.json").read_text())["entries"]
    assert (branches == 2) == any("+" in key.split(" | ")[1] for key in entries)  # the second search's blocks were timed
    assert (branches == 2) == ("branches" in result.report)
    # one branch: the budget met on the whole model measured; two: on the table's prediction, and the run says so
    assert (branches == 1) == ("measured_budget" in result.report["latency"])
    assert (branches == 2) == any("on the latency table's prediction only" in r.getMessage() for r in caplog.records)


class OddRanksSlower(FakeTimer):
    """The fake timer, but any block with an odd number of channels between its two layers takes 1 ms more than
    every original layer, as a rank off the runtime's channel blocks can."""

    @staticmethod
    def ms(module: nn.Module) -> float:
        odd = any(getattr(m, "out_channels", getattr(m, "out_features", 0)) % 2 for m in module.modules())
        return FakeTimer.ms(module) + (1.0 if odd else 0.0)


@pytest.mark.parametrize("offer_slower", [False, True])
def test_under_the_flops_objective_no_candidate_slower_than_its_layer_is_offered(tiny_fmnist, tmp_path, monkeypatch, offer_slower):
    from svdnas.pipeline import stages
    from svdnas.search import allocation, latency_costs

    def joined(spec):  # the channels between the block's two layers
        return max(spec.groups) * spec.rank

    timer = OddRanksSlower()
    monkeypatch.setattr(lt, "time_modules", timer)
    seen = {}

    def watched(model, candidates, table):
        seen["odd"] = sum(joined(s) % 2 for c in candidates.values() for s in c.specs)
        summary = latency_costs.offer_only_faster(model, candidates, table)
        seen["after"] = {n: (list(c.specs), c.latency) for n, c in candidates.items()}
        return summary

    monkeypatch.setattr(stages, "offer_only_faster", watched)
    def spectrum_wins(model, plans, images, device, derivation, closeness=None):  # the allocation's plan is held to the rule too
        return "spectrum", {"kl": {k: 0.0 for k in plans}, "kept": "spectrum", "images": len(images)}

    monkeypatch.setattr(allocation, "better_plan", spectrum_wins)
    config = CompressConfig(
        reduction=0.4, latency=LatencyConfig(cache=str(tmp_path / "lut.json"), anchors=0), offer_slower=offer_slower,
        grid=(0.1, 0.9, 0.05), search_images=200, proxy_images=64, search=SearchConfig(epochs=1, batch_size=64, target=0.5),
        derivation="whitened",
    )
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), config, filter_fn="convs+linear")
    if offer_slower:
        assert not seen and timer.calls == 0 and "slower_candidates" not in result.report
        return
    assert seen["odd"] > 0  # the grid had candidates this timer makes slower
    assert result.report["slower_candidates"]["slower_dropped"] == seen["odd"]
    for specs, latency in seen["after"].values():
        assert all(joined(s) % 2 == 0 for s in specs)
        assert all(t < latency[0] for t in latency[1:])  # every candidate offered is faster than the layer
    chosen = [s for specs in result.plan.layers.values() for s in specs]
    assert chosen and all(joined(s) % 2 == 0 for s in chosen)
    assert result.report["plan_check"]["kept"] == "spectrum"
    assert result.report["objective"] == "flops" and result.report["flops"]["reduction"] >= 0.4 - 0.01


class EveryBlockSlower(FakeTimer):
    """The fake timer, but every low-rank block takes 1 ms more than any original layer."""

    @staticmethod
    def ms(module: nn.Module) -> float:
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())
        return FakeTimer.ms(module) + (1.0 if layers > 1 else 0.0)


def test_a_flops_budget_is_met_even_when_every_candidate_is_slower(tiny_fmnist, monkeypatch, caplog):
    from svdnas.pipeline import stages
    from svdnas.search import latency_costs

    monkeypatch.setattr(lt, "time_modules", EveryBlockSlower())
    monkeypatch.setattr(stages, "offer_only_faster", latency_costs.offer_only_faster)
    config = CompressConfig(reduction=0.4, latency=LatencyConfig(cache="", anchors=0), search_images=200, proxy_images=64,
                            search=SearchConfig(epochs=1, batch_size=64, target=0.5), derivation="whitened")
    with caplog.at_level("WARNING"):
        result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), config, filter_fn="convs+linear")
    timed = result.report["slower_candidates"]
    assert timed["slower_offered_for_the_budget"] > 0 and timed["slower_dropped"] == 0
    assert result.report["flops"]["reduction"] >= 0.4 - 0.01
    assert "offered too, so the plan may run slower" in caplog.text


def test_an_unreachable_latency_budget_fails_before_the_accuracy_proxy(fake_timer, tiny_fmnist, tmp_path, monkeypatch):
    from svdnas.search import pruning

    def proxy(*a, **k):
        raise AssertionError("the accuracy proxy ran")

    monkeypatch.setattr(pruning, "measure_drops", proxy)
    config = CompressConfig(
        reduction=0.99, objective="latency", latency=LatencyConfig(cache=str(tmp_path / "lut.json")),
        search_images=200, proxy_images=64, search=SearchConfig(epochs=1, batch_size=64, target=0.5),
    )
    with pytest.raises(BudgetError, match="cannot be met: even rank 1 in every target layer removes at most"):
        compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), config, filter_fn="convs+linear")


def test_a_cached_run_measures_only_the_whole_model_and_draws_the_same_noise(fake_timer, tmp_path):
    model = tiny_net().eval()
    infos = trace_layers(model, torch.zeros(1, 1, 28, 28))
    cands = {n: grid_candidates(n, model.get_submodule(n), infos[n].input_hw, fraction_grid(0.3, 0.7)) for n in ("body.0", "body.4")}
    config = LatencyConfig(cache=str(tmp_path / "lut.json"))
    torch.manual_seed(0)
    first = attach_latency(model, (1, 28, 28), cands, LatencyTable("cpu", config))
    after_first = torch.rand(3)
    assert fake_timer.calls == first.table["measured"] + 1 > 1
    fake_timer.calls = 0
    torch.manual_seed(0)
    second = attach_latency(model, (1, 28, 28), cands, LatencyTable("cpu", config))
    assert fake_timer.calls == 1 and second.table["measured"] == 0
    assert torch.equal(torch.rand(3), after_first)  # measuring or not leaves the search's random draws alike
    assert second.total == first.total and second.fixed == pytest.approx(first.total - sum(c.latency[0] for c in cands.values()))


def test_the_report_measures_both_runtimes_and_says_when_the_model_is_slower():
    from svdnas.report.build import latency_block
    from svdnas.report.markdown import markdown as md

    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)).eval()
    # the "compressed" model does far more work: slower in any runtime
    big = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), *[nn.Conv2d(64, 64, 3, padding=1) for _ in range(6)]).eval()
    lat = latency_block(small, big, (1, 28, 28), "cpu", threads=1)
    assert lat["runtime"] == "onnxruntime" and set(lat["runtimes"]) == {"torch", "onnxruntime"}
    for fig in lat["runtimes"].values():
        # the reduction is the median of the rounds' own, near the ratio of the medians
        assert fig["compressed_ms"] > fig["original_ms"] and fig["reduction"] == pytest.approx(1 - fig["compressed_ms"] / fig["original_ms"], rel=0.25)
        assert fig["reduction"] < 0 and fig["spread"] >= 0
    assert lat["slower"] and lat["reduction"] == lat["runtimes"]["onnxruntime"]["reduction"]
    report = {"method": "m", "model": "x", "flops": {"original": 2, "compressed": 1, "reduction": 0.5},
              "params": {"original": 2, "compressed": 1, "reduction": 0.5}, "latency": lat}
    assert md(report).count("slower than the original") == 2
    faster = latency_block(big, small, (1, 28, 28), "cpu", threads=1, runtime="torch")
    assert faster["runtime"] == "torch" and not faster["slower"] and faster["reduction"] == faster["runtimes"]["torch"]["reduction"]


def test_the_runtime_is_checked():
    assert CompressConfig(reduction=0.3, objective="latency", runtime="onnxruntime").runtime == "onnxruntime"
    with pytest.raises(SpecError, match="--runtime must be one of"):
        CompressConfig(reduction=0.3, runtime="tvm")


def test_the_latency_budget_is_met_on_the_measured_whole_model(fake_timer, tiny_fmnist, tmp_path, monkeypatch):
    from svdnas.pipeline import stages

    overhead = 0.5 * FakeTimer.ms(tiny_net())  # what the table does not see: the model's fixed costs in the runtime
    seen = []

    def fake_compare(original, compressed, shape, runtime, **kw):
        seen.append(runtime)
        before, after = FakeTimer.ms(original) + overhead, FakeTimer.ms(compressed) + overhead
        return {"original_ms": before, "compressed_ms": after, "reduction": 1 - after / before}

    monkeypatch.setattr(stages, "compare_latency", fake_compare)
    config = CompressConfig(
        reduction=0.3, objective="latency", runtime="onnxruntime", latency=LatencyConfig(cache=str(tmp_path / "lut.json")),
        search_images=200, proxy_images=64, search=SearchConfig(epochs=2, batch_size=64, target=0.5), derivation="whitened",
        grid=(0.05, 0.95, 0.05),
    )
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), config, filter_fn="convs+linear")
    block = result.report["latency"]["measured_budget"]
    first, kept = block["attempts"][0], block["attempts"][block["kept"]]
    assert set(seen) == {"onnxruntime"} and block["runtime"] == "onnxruntime"
    assert fake_timer.engines == {"onnxruntime"}  # the table is timed in the runtime the budget is met in
    assert result.report["latency"]["predicted"]["table"]["engine"] == "onnxruntime"
    assert first["predicted_ms"] <= first["budget_ms"] and first["reduction"] < 0.29  # the table's plan fell short
    assert block["met"] and block["repairs"] >= 1 and kept["reduction"] >= 0.29
    # the plan kept is the one measured: the fake is additive, so its figure is the delivered model's
    assert kept["compressed_ms"] == pytest.approx(FakeTimer.ms(result.model) + overhead, rel=1e-6)
    assert result.report["seconds"]["latency_budget"] > 0
    assert "latency budget met on the whole model measured in onnxruntime" in markdown(result.report)


@pytest.mark.skipif(not onnxruntime_available(), reason="needs ONNX Runtime")
def test_an_onnx_runtime_table_measures_every_candidate_in_onnx_runtime(tmp_path):
    layer = nn.Conv2d(16, 16, 3, padding=1)
    variants = _variants(layer)
    table = LatencyTable("cpu", LatencyConfig(cache=str(tmp_path / "ort.json"), repeats=3, warmup=1, threads=1), engine="onnxruntime")
    times = table.candidates(layer, (8, 8), variants)
    assert len(times) == len(variants) and all(t > 0 for t in times)
    assert table.measured == len(variants)  # no interpolation between anchors: every rank measured
    table.save()
    saved = json.loads((tmp_path / "ort.json").read_text())
    assert saved["engine"] == "onnxruntime" and "onnxruntime" in saved
    again = LatencyTable("cpu", LatencyConfig(cache=str(tmp_path / "ort.json"), threads=1), engine="onnxruntime")
    assert again.candidates(layer, (8, 8), variants) == times and again.measured == 0
    # a PyTorch table does not take the ONNX Runtime one's figures
    assert LatencyTable("cpu", LatencyConfig(cache=str(tmp_path / "ort.json"), threads=1)).entries == {}
    assert default_cache_path("cpu", 2, "onnxruntime").name == "latency-cpu-2-onnxruntime.json"
    with pytest.raises(SpecError, match="engine"):
        LatencyTable("cpu", engine="tvm")
