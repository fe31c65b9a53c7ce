import json
import sys

import pytest
import torch

from svdnas import LowRankSpec, Plan, apply_plan
from svdnas.cost.timer import measure, spread, torch_latency
from svdnas.errors import SpecError, SvdnasError
from svdnas.runs.directory import save_run
from svdnas.runs.export import export_onnx
from svdnas.zoo import create_model
from tests.conftest import run_cli

pytest.importorskip("onnxruntime")


def test_onnx_round_trip_of_a_compressed_model(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    plan = Plan({"layer1.0.conv1": [LowRankSpec((3, 1), (1, 1), 8), LowRankSpec((1, 3), (2, 1), 2)],
                 "layer2.0.downsample.0": [LowRankSpec((1, 1), (1, 4), 4)], "fc": [LowRankSpec((1, 1), (1, 1), 5)]})
    apply_plan(model, plan)
    result = export_onnx(model, (1, 28, 28), tmp_path / "m.onnx")
    assert result["max_abs_diff"] < 1e-4 and (tmp_path / "m.onnx").stat().st_size > 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 28, 28)
    assert abs(session.run(None, {"input": x.numpy()})[0] - model(x).detach().numpy()).max() < 1e-4


def test_export_and_latency_commands(tmp_path):
    model = create_model("mobilenetv2").eval()
    plan = Plan({"features.2.conv.0.0": [LowRankSpec((1, 1), (1, 1), 4)]})
    apply_plan(model, plan)
    save_run(tmp_path / "run", model, plan, "zoo:mobilenetv2", (1, 28, 28))
    r = run_cli("export", tmp_path / "run", "--onnx", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "max abs difference" in r.stdout
    # the exported graph computes what the saved run computes
    import onnxruntime as ort

    import svdnas

    x = torch.randn(3, 1, 28, 28)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = svdnas.load(str(tmp_path / "run")).eval()(x).numpy()
    assert abs(session.run(None, {"input": x.numpy()})[0] - expected).max() < 1e-4
    r = run_cli("latency", tmp_path / "run", "--onnx", "--repeats", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["pytorch"]["median_ms"] > 0 and out["onnxruntime"]["median_ms"] > 0
    assert out["pytorch"]["p10_ms"] <= out["pytorch"]["median_ms"] <= out["pytorch"]["p90_ms"]
    r = run_cli("latency", tmp_path / "run", "--runtime", "onnxruntime", "--repeats", "3", "--json")
    assert r.returncode == 0, r.stderr
    only = json.loads(r.stdout.strip().splitlines()[-1])
    assert "pytorch" not in only and only["onnxruntime"]["median_ms"] > 0


def test_the_spread_of_few_times_stays_within_them():
    for times in ([2.0, 1.0], [3.0, 1.0, 2.0], [5.0, 1.0, 1.5, 1.2]):
        s = spread(times)
        assert min(times) <= s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] <= max(times)
    assert spread([4.0]) == {"median_ms": 4.0, "p10_ms": 4.0, "p90_ms": 4.0}
    many = [float(i) for i in range(1, 102)]  # 1..101: the inclusive 10th and 90th percentiles are 11 and 91
    assert spread(many) == {"median_ms": 51.0, "p10_ms": 11.0, "p90_ms": 91.0}


def test_an_export_that_onnx_runtime_cannot_run_is_one_error(monkeypatch):
    import onnxruntime as ort

    def refuse(*args, **kwargs):
        raise ort.capi.onnxruntime_pybind11_state.NotImplemented("no kernel for this opset")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(SvdnasError, match="the ONNX export at opset 17 failed: NotImplemented: no kernel for this opset"):
        export_onnx(torch.nn.Linear(4, 2), (4,), "/tmp/never.onnx")
    with pytest.raises(SpecError, match="writes opsets 7 to 20; got 6"):
        export_onnx(torch.nn.Linear(4, 2), (4,), "/tmp/never.onnx", opset=6)


def test_measure_and_missing_onnx(monkeypatch):
    calls = []
    stats = measure(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9 and stats["repeats"] == 7 and stats["min_ms"] <= stats["median_ms"]
    assert torch_latency(torch.nn.Linear(4, 2), (4,), repeats=3)["median_ms"] > 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SvdnasError, match=r"pip install 'svdnas\[onnx\]'"):
        export_onnx(torch.nn.Linear(4, 2), (4,), "/tmp/never.onnx")


def _optimized_ops(model: torch.nn.Module) -> dict[str, int]:
    """Op types of ``model``'s exported graph after ONNX Runtime's CPU graph optimisations (fusions)."""
    from svdnas.cost.onnx import optimized_ops

    return optimized_ops(model, torch.randn(1, 1, 28, 28), extended_only=True, dynamic_batch=True)


def test_onnx_runtime_fuses_batchnorm_and_activation_into_the_blocks_second_convs():
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    before = _optimized_ops(model)
    plan = Plan({"layer1.0.conv1": [LowRankSpec((3, 1), (1, 1), 8)], "layer1.0.conv2": [LowRankSpec((3, 3), (4, 1), 2)],
                 "layer2.0.conv1": [LowRankSpec((1, 1), (1, 2), 4)], "layer3.1.conv1": [LowRankSpec((1, 3), (1, 1), 6)]})
    after = _optimized_ops(apply_plan(model, plan))
    convs = sum(v for k, v in before.items() if k in ("Conv", "FusedConv"))
    # every BatchNormalization folded into a conv, every ReLU that followed a conv (with its BN) fused
    # into the block's second conv as it was into the original conv; each block adds one conv
    assert before.get("BatchNormalization", 0) == after.get("BatchNormalization", 0) == 0
    assert after.get("Relu", 0) == before.get("Relu", 0)
    assert after.get("FusedConv", 0) == before.get("FusedConv", 0) > 0
    assert sum(v for k, v in after.items() if k in ("Conv", "FusedConv")) == convs + len(plan.layers)
