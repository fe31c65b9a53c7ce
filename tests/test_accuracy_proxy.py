import copy
import json
import math

import pytest
import torch
from torch import nn

import svdnas.lowrank.derivation as derivation_module
import svdnas.search.accuracy_proxy as ap
from svdnas.data.evaluate import evaluate
from svdnas.lowrank.decompose import decompose
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig, grid_candidates
from svdnas.surgery.swap import set_submodule
from svdnas.surgery.trace import example_input, trace_layers


class Residual(nn.Module):
    """Skip connections, in-place activations, a module called twice and a functional prefix:
    what the replay of the layers before a target must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice: never replayed
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x * 2 - 1))
        x = self.shared(x) + x
        y = self.act(self.bn(self.a(x)))
        y = self.shared(y) + x
        y = self.act(self.b(y)) + y
        return self.head(y.mean((2, 3)))


@pytest.fixture
def residual_and_data():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(96, 1, 12, 12) * torch.rand(96, 1, 1, 1) * 3
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.head.bias.zero_()
        z = model(x)  # centre and scale the logits so that the predictions spread over classes
        model.head.bias.sub_(z.mean(0)).div_(z.std(0).mean())
        model.head.weight.div_(z.std(0).mean())
        y = model(x).argmax(1)  # labels the model mostly gets right, so that compression can lose accuracy
    y[::7] = (y[::7] + 1) % 10
    return model, torch.utils.data.TensorDataset(x, y)


def test_replayable_modules_are_the_outermost_finished_before_the_target(residual_and_data):
    model, _ = residual_and_data
    got = set(ap.replayable_modules(model, "b", torch.rand(2, 1, 12, 12)))
    assert got == {"stem", "a", "bn"}  # act and shared run more than once; head runs after
    assert ap.replayable_modules(model, "stem", torch.rand(2, 1, 12, 12)) == []


@pytest.mark.parametrize("name", ["stem", "a", "b"])
def test_replayed_top1_equals_the_replaced_model(residual_and_data, name):
    model, data = residual_and_data
    before = copy.deepcopy(model.state_dict())
    ev = ap.OneLayerEvaluator(model, name, data, "cpu", batch_size=40)
    layer = model.get_submodule(name)
    assert ev.original_top1 == pytest.approx(evaluate(model, data)["top1"])
    variants = [decompose(layer, [spec]) for spec in _specs(layer)]
    got = ev.top1([layer, *variants])
    want = [ev.original_top1]
    for v in variants:  # the reference: the layer really replaced, the whole model run
        replaced = copy.deepcopy(model)
        set_submodule(replaced, name, copy.deepcopy(v))
        want.append(evaluate(replaced, data)["top1"])
    assert got == pytest.approx(want)
    assert len(set(got)) > 1  # the candidates differ, so the comparison means something
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all("forward" not in vars(m) for m in model.modules())  # every swap undone


def test_cached_prefix_gives_the_same_top1_with_one_recording_per_batch(residual_and_data, monkeypatch):
    model, data = residual_and_data
    layer = model.b
    variants = [decompose(layer, [spec]) for spec in _specs(layer)]
    records = []
    real = ap.PrefixRecording.record
    monkeypatch.setattr(ap.PrefixRecording, "record", lambda self, x, names: records.append((self, len(x))) or real(self, x, names))

    def passes(ev):  # recording passes over whole batches (not the few images of the replay check)
        return sum(1 for r, n in records if r is ev.recording and n > ev.check_images)

    uncached = ap.OneLayerEvaluator(model, "b", data, "cpu", batch_size=40, cache_mib=0)
    cached = ap.OneLayerEvaluator(model, "b", data, "cpu", batch_size=40)
    assert passes(uncached) == 0 and passes(cached) == len(cached.batches)  # the original's top-1 recorded them
    want = [uncached.top1(variants[:2]), uncached.top1(variants[2:])]
    assert passes(uncached) == 2 * len(uncached.batches)  # every call records every batch
    got = [cached.top1(variants[:2]), cached.top1(variants[2:])]
    assert got == want
    assert passes(cached) == len(cached.batches)  # recorded once, then reused


def test_one_recording_serves_every_layer_with_the_same_top1(residual_and_data, monkeypatch):
    model, data = residual_and_data
    records = []
    real = ap.PrefixRecording.record
    monkeypatch.setattr(ap.PrefixRecording, "record", lambda self, x, names: records.append(len(x)) or real(self, x, names))
    shared = ap.PrefixRecording(model, data, "cpu", ["a", "b"], batch_size=40)
    assert shared.kept == {"stem", "a", "bn"}  # what "a" and "b" replay, together
    for name in ("a", "b"):
        layer = model.get_submodule(name)
        variants = [decompose(layer, [spec]) for spec in _specs(layer)]
        alone = ap.OneLayerEvaluator(model, name, data, "cpu", batch_size=40, cache_mib=0).top1(variants)
        records.clear()
        ev = ap.OneLayerEvaluator(model, name, None, "cpu", recording=shared)
        assert ev.recording is shared and ev.top1(variants) == alone
        full = [n for n in records if n > ev.check_images]  # passes over whole batches
        assert len(full) == (len(ev.batches) if name == "a" else 0)  # recorded for "a", reused for "b"
    assert shared.original_top1() == pytest.approx(evaluate(model, data)["top1"])
    # too much to keep for every layer: each layer records its own
    small = ap.PrefixRecording(model, data, "cpu", ["a", "b"], batch_size=40, cache_mib=1e-3)
    assert small.kept == set() and small.for_layer("b") is not small


def test_screening_stops_only_candidates_certain_to_fail(residual_and_data):
    model, data = residual_and_data
    layer = model.b
    variants = [layer, *(decompose(layer, [spec]) for spec in _specs(layer))]  # the layer itself passes
    ev = ap.OneLayerEvaluator(model, "b", data, "cpu", batch_size=16)
    exact = [ev.original_top1 - a for a in ev.top1(variants)]
    assert max(exact) > 20 and min(exact) < 5  # some candidates fail by far, some pass
    for threshold in (1.0, 5.0, 20.0):
        screened = ev.screen(variants, threshold)
        for d, (acc, is_exact) in zip(exact, screened):
            bound = ev.original_top1 - acc
            assert (d <= threshold) == (bound <= threshold)  # the same verdict
            if is_exact:
                assert bound == pytest.approx(d)
            else:
                assert threshold < bound <= d + 1e-9  # a lower bound of the drop, already over
        assert any(not e for _, e in screened) or threshold >= max(exact)


def test_a_bound_is_measured_again_when_the_threshold_rises(residual_and_data):
    model, data = residual_and_data
    cands = grid_candidates("b", model.b, (12, 12), [0.1 * k for k in range(1, 10)], "flops")
    low = ap.measure_drops(model, cands, data, "cpu", 1.0)
    assert low.bounds  # some candidates were stopped early
    for t in (30.0, 60.0):
        again = ap.measure_drops(model, cands, data, "cpu", t, known=low)
        fresh = ap.measure_drops(model, cands, data, "cpu", t)
        assert ap.passing(cands, again, t) == ap.passing(cands, fresh, t)
        assert ap.passing(cands, again, t) != ap.passing(cands, low, 1.0)
        remeasured = {i for i in low.bounds if low.drops[i] <= t and (i not in again.bounds or again.drops[i] != low.drops[i])}
        assert remeasured  # bounds under the new threshold did not decide anything: measured again
    full = ap.measure_drops(model, cands, data, "cpu", 1.0, exhaustive=True)
    assert not full.bounds and len(full.drops) == len(cands.specs)


def _specs(layer):
    from svdnas.lowrank.spec import LowRankSpec

    if layer.in_channels == 1:  # the stem: a 3x1 split holds at most 3 ranks
        return [LowRankSpec((3, 1), (1, 1), r) for r in (1, 2)] + [LowRankSpec((1, 1), (1, 1), 1)]
    return [LowRankSpec((3, 1), (1, 1), r) for r in (1, 2, 6)] + [LowRankSpec((1, 1), (1, 1), 1)]


def test_an_unfaithful_replay_falls_back_to_full_passes(residual_and_data, monkeypatch):
    model, data = residual_and_data
    monkeypatch.setattr(ap, "_clone", lambda out: torch.zeros_like(out))  # a replay that breaks the model
    ev = ap.OneLayerEvaluator(model, "b", data, "cpu")
    assert ev.replay == []
    assert ev.top1([model.b]) == [pytest.approx(ev.original_top1)]


def test_bisection_keeps_what_exhaustive_search_keeps_when_drops_fall_with_rank(residual_and_data, monkeypatch):
    model, data = residual_and_data
    layer = model.a
    cands = grid_candidates("a", layer, (12, 12), [0.1 * k for k in range(1, 10)], "flops")
    fams = {s.family() for s in cands.specs}
    assert len(fams) > 2 and len(cands.specs) > 3 * len(fams)
    cut = {f: 1 + 2 * k for k, f in enumerate(sorted(fams))}  # per family, the rank where the drop falls to 4pp
    calls = []

    class Marker(nn.Identity):  # stands for a decomposed layer, remembering its spec
        def __init__(self, layer, specs):
            super().__init__()
            self.spec = specs[-1]

    def fake_screen(self, layers, threshold=None):
        calls.append(len(layers))
        return [(self.original_top1 - (4.0 if m.spec.rank >= cut[m.spec.family()] else 30.0 - m.spec.rank), True) for m in layers]

    monkeypatch.setattr(derivation_module, "decompose", Marker)  # what the weight derivation calls
    monkeypatch.setattr(ap.OneLayerEvaluator, "screen", fake_screen)
    full = ap.measure_drops(model, cands, data, "cpu", 5.0, exhaustive=True)
    fast = ap.measure_drops(model, cands, data, "cpu", 5.0)
    assert ap.passing(cands, fast, 5.0) == ap.passing(cands, full, 5.0)
    assert 0 < len(ap.passing(cands, full, 5.0)) < len(cands.specs)
    assert len(fast.drops) < len(full.drops)
    n = len(calls)
    again = ap.measure_drops(model, cands, data, "cpu", 5.0, known=fast)
    assert again.drops == fast.drops and len(calls) == n  # nothing measured twice


def _config(**kw):
    base = {"reduction": 0.5, "search_images": 200, "proxy_images": 64, "search": SearchConfig(epochs=2, batch_size=64, target=0.5)}
    base.update(kw)
    return CompressConfig(**base)


def test_compress_reports_the_proxy_and_relaxes_a_threshold_the_budget_cannot_live_with(trained_tiny, tmp_path, caplog):
    model, data = trained_tiny
    r = compress(model, data, _config(families=0, proxy_drop=5.0), filter_fn="convs").report
    p = r["accuracy_proxy"]
    assert p["threshold_pp"] == 5.0 and p["images"] == 64 and p["evaluated"] > 0
    assert p["shared_recording"] and 0 <= p["stopped_early"] <= p["evaluated"]
    assert p["candidates_after"] <= p["candidates_before"] and r["flops"]["reduction"] >= 0.49
    # a threshold no cheap candidate meets: doubled until the 0.6 budget can be met, and met
    r = compress(model, data, _config(reduction=0.6, families=0, proxy_drop=0.01, max_groups=1), filter_fn="convs", out=tmp_path, resume=True).report
    p = r["accuracy_proxy"]
    doublings = math.log2(p["threshold_used_pp"] / 0.01)  # the threshold doubles (up to 100) until the budget can be met
    assert doublings >= 1 and (doublings == pytest.approx(round(doublings)) or p["threshold_used_pp"] == 100) and "trying" in caplog.text
    assert r["flops"]["reduction"] >= 0.59
    off = compress(model, data, _config(families=0, proxy_drop=0.0), filter_fn="convs").report
    assert "accuracy_proxy" not in off


def test_the_accuracy_proxy_checkpoint_lets_a_resumed_run_skip_measuring(trained_tiny, tmp_path, monkeypatch):
    from svdnas.search.pruning import accuracy_prune

    model, data = trained_tiny
    infos = trace_layers(model, example_input(model, (1, 28, 28)))
    cands = {n: grid_candidates(n, model.get_submodule(n), infos[n].input_hw, [0.2, 0.4, 0.6], "flops") for n in ("body.0", "body.4")}
    proxy = torch.utils.data.Subset(data.train, list(range(64)))
    ckpt = tmp_path / "checkpoint-accuracy.json"
    config = _config(proxy_drop=5.0)
    kept, summary = accuracy_prune(model, cands, proxy, config.proxy_drop, config.objective, config.reduction, 1e9, "cpu", ckpt, None)
    saved = json.loads(ckpt.read_text())
    assert set(saved["layers"]) == {"body.0", "body.4"}

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(ap.OneLayerEvaluator, "__init__", boom)
    kept2, summary2 = accuracy_prune(model, cands, proxy, config.proxy_drop, config.objective, config.reduction, 1e9, "cpu", ckpt, None)
    assert summary2["evaluated"] == summary["evaluated"]
    assert {n: [s for s in c.specs] for n, c in kept2.items()} == {n: [s for s in c.specs] for n, c in kept.items()}
    # as many candidates per layer, other ones (as a run that timed them differently would offer): measured
    # again, not read by index from the checkpoint
    other = {n: c.subset(lambda s, first=c.specs[0]: s != first) for n, c in cands.items()}
    shifted = {n: c.subset(lambda s, last=c.specs[-1]: s != last) for n, c in cands.items()}
    monkeypatch.undo()
    accuracy_prune(model, other, proxy, config.proxy_drop, config.objective, config.reduction, 1e9, "cpu", ckpt, None)
    assert json.loads(ckpt.read_text())["candidates"] != saved["candidates"]  # measured for the new set, and saved
    monkeypatch.setattr(ap.OneLayerEvaluator, "__init__", boom)
    assert {n: len(c) for n, c in shifted.items()} == {n: len(c) for n, c in other.items()}
    with pytest.raises(AssertionError, match="measured again"):
        accuracy_prune(model, shifted, proxy, config.proxy_drop, config.objective, config.reduction, 1e9, "cpu", ckpt, None)


def test_the_accuracy_proxy_is_on_by_default_only_for_the_weight_derivation():
    assert CompressConfig(reduction=0.5).proxy_drop == 0.0
    assert CompressConfig(reduction=0.5, derivation="whitened").proxy_drop == 0.0
    assert CompressConfig(reduction=0.5, derivation="weight").proxy_drop == 5.0
    assert CompressConfig(reduction=0.5, proxy_drop=2.5).proxy_drop == 2.5
    assert CompressConfig(reduction=0.5, derivation="weight", proxy_drop=0).proxy_drop == 0
