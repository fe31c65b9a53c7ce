"""Defects found by reading the code as a newcomer, each pinned by a test that failed before its fix."""

import copy

import pytest
import torch
from torch import nn

from svdnas.cost.counting import layer_cost, model_macs
from svdnas.errors import SpecError
from svdnas.surgery.targets import PRESETS, select_targets
from svdnas.surgery.trace import check_input, example_input, trace_layers
from tests.conftest import tiny_net


def _targets(model, filter_fn):
    infos = trace_layers(model, example_input(model, (1, 28, 28)))
    return select_targets(model, infos, filter_fn)


def test_a_preset_function_filters_as_its_name_does():
    model = tiny_net()
    by_name, _ = _targets(model, "all-but-first")
    by_function, _ = _targets(model, PRESETS["all-but-first"])
    assert "stem" not in by_name
    assert by_function == by_name


class SharedConv(nn.Module):
    """One conv applied twice: its weights are shared between the two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.once = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.shared(self.shared(self.stem(x)))
        return self.head(self.once(x).mean((2, 3)))


def test_a_layer_called_twice_is_not_a_target_and_its_calls_are_counted():
    model = SharedConv()
    infos = trace_layers(model, example_input(model, (1, 12, 12)))
    assert infos["shared"].calls == 2 and infos["once"].calls == 1
    targets, skipped = select_targets(model, infos, "convs")
    assert "shared" not in targets and "once" in targets
    assert "shared weights" in skipped["shared"]
    # what the whole-model count sees: both calls of the shared layer
    per_layer = sum(layer_cost(model.get_submodule(n), infos[n].input_hw)[0] * infos[n].calls for n in ("stem", "shared", "once"))
    assert model_macs(model, (1, 12, 12)) == per_layer + 8 * 10


class Buggy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x) + {"a": 1}  # a TypeError of the model's own code


def test_a_bug_in_the_model_is_not_reported_as_a_wrong_input_shape():
    with pytest.raises(SpecError) as e:
        check_input(Buggy(), (1, 8, 8))
    assert "--input-shape" not in str(e.value)
    assert "TypeError" in str(e.value) and "test_defects.py" in str(e.value)


def test_a_wrong_input_shape_is_still_reported_as_one():
    with pytest.raises(SpecError, match="--input-shape"):
        check_input(tiny_net(), (3, 28, 28))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_compress_leaves_the_callers_model_as_it_was(trained_tiny):
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.search import SearchConfig

    model, data = trained_tiny
    model = copy.deepcopy(model).train()
    before = _state(model)
    config = CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                            search=SearchConfig(epochs=1, target=0.5))
    result = compress(model, data, config, filter_fn="convs", seed=0)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.model is not model and not result.model.training


def test_run_baseline_leaves_the_callers_model_as_it_was(trained_tiny):
    from svdnas.pipeline.baseline import run_baseline

    model, data = trained_tiny
    model = copy.deepcopy(model).train()
    before = _state(model)
    run_baseline("uniform", model, data, 0.3, filter_fn="convs")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_and_latency_leave_the_callers_model_as_it_was(tmp_path):
    pytest.importorskip("onnxruntime")
    from svdnas.cost.timer import onnx_latency, torch_latency
    from svdnas.runs.export import export_onnx

    model = tiny_net().train()
    export_onnx(model, (1, 28, 28), tmp_path / "m.onnx")
    assert model.training
    onnx_latency(model, (1, 28, 28), warmup=1, repeats=2)
    assert model.training
    torch_latency(model, (1, 28, 28), warmup=1, repeats=2)
    assert model.training


def test_the_output_error_proxy_picks_by_the_objectives_cost():
    from svdnas.lowrank.spec import LowRankSpec
    from svdnas.search.candidates import LayerCandidates
    from svdnas.search.output_proxy import output_errors

    layer = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(4, 8, 6, 6)
    fam = ((3, 1), (1, 1))
    specs = [LowRankSpec(*fam, r) for r in (1, 2, 3)]
    # costs chosen so that MACs and params disagree on which candidate is nearest half the original
    cands = LayerCandidates("conv", (6, 6), specs, macs=[100, 50, 70, 90], params=[100, 90, 70, 50])
    flops = output_errors(layer, x, cands, 0.5, objective="flops")[fam]
    params = output_errors(layer, x, cands, 0.5, objective="params")[fam]
    y = layer(x)

    def err(spec):
        from svdnas import decompose

        return ((decompose(layer, [spec])(x) - y).pow(2).sum() / y.pow(2).sum()).item()

    assert flops == pytest.approx(err(specs[0]))
    assert params == pytest.approx(err(specs[2]))


def test_compress_with_whitened_factors_uses_them_in_the_final_model(trained_tiny):
    from svdnas.lowrank.calibration import Sampling
    from svdnas.lowrank.derivation import calibrate
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.search import SearchConfig

    model, data = trained_tiny
    config = CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                            derivation="whitened", calibration_images=64, search=SearchConfig(epochs=1, target=0.5))
    result = compress(model, data, config, filter_fn="convs", seed=0)
    assert result.report["derivation"] == "whitened" and result.report["calibration"]["images"] == 64
    assert result.report["calibration"]["bytes"] > 0 and result.report["calibration"]["patches_per_column"] == 256
    name, specs = next((n, s) for n, s in result.plan.layers.items() if s)
    from svdnas.data.datasets import search_subset

    subset, _ = search_subset(data.train, 100, 0)  # the search images; calibration takes their first 64
    x = torch.stack([subset[i][0] for i in range(64)])
    # a 28x28 map gives more patches per column than the default 256: every k-th is summed, as here
    expected = calibrate(model, "whitened", {name: specs}, [x], "cpu", sampling=Sampling(64)).block(name, model.get_submodule(name), specs)
    got = result.model.get_submodule(name)
    for a, b in zip(got.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    plain = compress(model, data, CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                                                 derivation="weight", search=SearchConfig(epochs=1, target=0.5)), filter_fn="convs", seed=0)
    assert "calibration" not in plain.report and plain.report["derivation"] == "weight"


def test_report_says_when_the_plots_cannot_be_drawn(tmp_path, monkeypatch, caplog):
    import json
    import logging
    import sys

    from svdnas.report.plots import write_report

    cost = {"original": 10, "compressed": 5, "reduction": 0.5}
    (tmp_path / "report.json").write_text(json.dumps({"method": "svdnas", "model": "m", "flops": cost, "params": cost, "layers": []}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level(logging.WARNING):
        written = write_report(tmp_path)
    assert written == [tmp_path / "report.md"]
    assert any("matplotlib" in r.getMessage() for r in caplog.records)


def test_the_search_draws_its_noise_from_its_own_seed_not_the_global_generator(trained_tiny):
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.search import SearchConfig

    model, data = trained_tiny
    config = CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                            search=SearchConfig(epochs=2, target=0.5))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(compress(model, data, config, filter_fn="convs", seed=0))
        assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
    assert runs[0].history["logits"] == runs[1].history["logits"]
    assert runs[0].plan.to_dict() == runs[1].plan.to_dict()


def test_a_finetune_config_made_without_a_mode_gets_the_runs_modes_settings(trained_tiny, monkeypatch):
    from svdnas.lowrank.plan import Plan
    from svdnas.recovery import recover as recover_module
    from svdnas.recovery.distill import DEFAULT_EPOCHS, DEFAULT_LR, FinetuneConfig, FinetuneHistory

    model, data = trained_tiny
    seen = {}

    def fake_distill(student, teacher, layers, train, val, config, *args, **kw):
        seen["config"] = config
        return FinetuneHistory()

    monkeypatch.setattr(recover_module, "distill", fake_distill)
    block = recover_module.recover(model, copy.deepcopy(model), Plan({"stem": []}), "full", FinetuneConfig(val_images=100), data, None)
    config = seen["config"]
    assert (config.mode, config.epochs, config.lr, config.update_bn) == ("full", DEFAULT_EPOCHS["full"], DEFAULT_LR["full"], True)
    assert block["config"]["epochs"] == DEFAULT_EPOCHS["full"]
    # settings the user gave are kept
    recover_module.recover(model, copy.deepcopy(model), Plan({"stem": []}), "full", FinetuneConfig(epochs=7, lr=0.5, val_images=100), data, None)
    assert (seen["config"].epochs, seen["config"].lr) == (7, 0.5)


def test_compress_is_exported_at_the_top_level_without_command_line_notions():
    import inspect

    import svdnas
    from svdnas.pipeline.compress import compress

    assert svdnas.compress is compress and svdnas.CompressConfig.__name__ == "CompressConfig"
    params = inspect.signature(svdnas.compress).parameters
    assert "model_spec" not in params and params["resume"].default is False


def test_a_python_run_saves_its_config(trained_tiny, tmp_path):
    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.runs.directory import load_config
    from svdnas.search import SearchConfig

    model, data = trained_tiny
    config = CompressConfig(reduction=0.3, search_images=100, proxy_images=32, families=2, proxy_drop=0,
                            search=SearchConfig(epochs=1, target=0.5))
    compress(model, data, config, filter_fn="convs", out=tmp_path / "run")
    assert load_config(tmp_path / "run", CompressConfig) == config


def _mixed_modes() -> nn.Module:
    """A TinyNet in training mode with its body in eval mode and its stem's weight frozen (a frozen part, say)."""
    model = tiny_net().train()
    model.body.eval()
    model.stem.weight.requires_grad_(False)
    return model


def _state_flags(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_every_pass_that_evaluates_the_callers_model_does_so_in_eval_mode_and_puts_each_modules_mode_back():
    """Each pass runs every module in eval mode (a copy of the model included), and then puts back each
    module's own mode and each parameter's ``requires_grad`` (``model.train(was)`` would set one mode for
    every module: the frozen body would come back training)."""
    from torch.utils.data import TensorDataset

    from svdnas.data import evaluate as evaluation
    from svdnas.lowrank.derivation import calibrate
    from svdnas.lowrank.plan import Plan
    from svdnas.lowrank.spec import LowRankSpec
    from svdnas.recovery.distill import FinetuneConfig, agreement, distill
    from svdnas.recovery.synthetic import SynthConfig, generate
    from svdnas.search.accuracy_proxy import PrefixRecording
    from svdnas.search.output_proxy import capture_inputs
    from svdnas.surgery.prefix import fit_on_prefix

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 12, 12, generator=g)
    data = TensorDataset(x, torch.zeros(16, dtype=torch.long))
    spec = LowRankSpec((3, 3), (1, 1), 4)

    def evaluate_as_it_is(m):  # where no channels-last copy can be made (or off a CPU) the model itself runs
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(evaluation, "_channels_last", lambda model, device: None)
            evaluation.evaluate(m, data)

    passes = {
        "evaluate": lambda m: evaluation.evaluate(m, data),
        "evaluate, the model as it is": evaluate_as_it_is,
        "check_input": lambda m: check_input(m, (1, 12, 12)),
        "trace_layers": lambda m: trace_layers(m, example_input(m, (1, 12, 12))),
        "capture_inputs": lambda m: capture_inputs(m, ["body.0"], data, "cpu"),
        "calibrate": lambda m: calibrate(m, "whitened", {"body.0": [spec]}, [x], "cpu"),
        "fit_on_prefix": lambda m: fit_on_prefix(m, Plan({"body.0": [spec]}), ["body.0"], [x], "cpu"),
        "accuracy proxy": lambda m: PrefixRecording(m, data, "cpu", ["body.0"]),
        "synthetic images": lambda m: generate(m, (1, 12, 12), SynthConfig(num=2, batch_size=2, iterations=1)),
        "distillation's teacher": lambda m: distill(tiny_net(), m, ["body.0"], data, data, FinetuneConfig(epochs=1, batch_size=8)),
        "agreement with a teacher": lambda m: agreement(tiny_net(), m, data),
    }
    for name, run in passes.items():
        model = _mixed_modes()
        before = _state_flags(model)
        seen: list[bool] = []
        for m in model.modules():  # hooks a copy of the model takes along record the copy's modules
            m.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(module.training))
        run(model)
        assert seen and not any(seen), f"{name}: a module ran in training mode"
        assert _state_flags(model) == before, name
