import json

import pytest
import torch

from svdnas import LowRankBlock, LowRankSpec, Plan, SpecError, apply_plan, select_targets, trace_layers
from svdnas.runs.directory import load_run, save_run
from svdnas.zoo import create_model
from tests.conftest import tiny_net


def test_trace_records_shapes_in_forward_order(tiny):
    infos = trace_layers(tiny, torch.zeros(1, 1, 28, 28))
    assert list(infos) == ["stem", "body.0", "body.3", "body.4", "head"]
    assert infos["body.0"].input_hw == (28, 28) and infos["body.0"].output_hw == (14, 14)
    assert infos["head"].input_hw == (1, 1)


def test_presets_and_unsupported_layers(tiny):
    infos = trace_layers(tiny, torch.zeros(1, 1, 28, 28))
    targets, skipped = select_targets(tiny, infos, "all-but-first")
    assert targets == ["body.0", "body.4"]
    assert "depthwise" in skipped["body.3"]
    assert select_targets(tiny, infos, "pointwise")[0] == ["body.4"]
    assert select_targets(tiny, infos, "convs+linear")[0] == ["stem", "body.0", "body.4", "head"]
    custom = select_targets(tiny, infos, lambda m, name: name.startswith("body"))[0]
    assert custom == ["body.0", "body.4"]
    with pytest.raises(SpecError, match="unknown layer filter"):
        select_targets(tiny, infos, "everything")


def test_zoo_presets_match_the_paper():
    r18 = create_model("resnet18")
    t, _ = select_targets(r18, trace_layers(r18, torch.zeros(1, 1, 28, 28)), "all-but-first")
    assert "conv1" not in t and len(t) == 19 and "layer2.0.downsample.0" in t
    mb = create_model("mobilenetv2")
    t, skipped = select_targets(mb, trace_layers(mb, torch.zeros(1, 1, 28, 28)), "pointwise")
    assert len(t) == 34 and all(tuple(mb.get_submodule(n).kernel_size) == (1, 1) for n in t)
    assert sum("depthwise" in r for r in skipped.values()) == 17


def test_plan_round_trip_and_full_rank_model_is_exact(tiny, tmp_path):
    plan = Plan({"body.0": [LowRankSpec((3, 3), (1, 1), 16)], "body.4": [LowRankSpec((1, 1), (1, 2), 12)], "head": [LowRankSpec((1, 1), (1, 1), 10)]})
    assert Plan.from_json(plan.to_json()) == plan
    x = torch.randn(3, 1, 28, 28)
    reference = tiny(x)
    compressed = apply_plan(tiny_net().eval(), plan)
    assert isinstance(compressed.body[0], LowRankBlock)
    assert torch.allclose(compressed(x), reference, atol=1e-4)
    # save and rebuild from the directory alone (the base is a Python object: pass the architecture)
    save_run(tmp_path, compressed, plan, "python:TinyNet", (1, 28, 28))
    assert json.loads((tmp_path / "plan.json").read_text())["layers"][0]["name"] == "body.0"
    loaded, info = load_run(tmp_path, base_model=tiny_net())
    assert torch.equal(loaded(x), compressed(x)) and info.input_shape == (1, 28, 28)
    with pytest.raises(SpecError, match="Python object"):
        load_run(tmp_path)


def test_run_directory_of_a_zoo_model_loads_without_base(tmp_path):
    model = create_model("mobilenetv2").eval()
    plan = Plan({"features.2.conv.0.0": [LowRankSpec((1, 1), (1, 1), 4)]})
    apply_plan(model, plan)
    save_run(tmp_path, model, plan, "zoo:mobilenetv2", (1, 28, 28))
    loaded, _ = load_run(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_plan_errors(tiny):
    with pytest.raises(SpecError, match="does not have"):
        apply_plan(tiny, Plan({"nope": [LowRankSpec((1, 1), (1, 1), 1)]}))
    with pytest.raises(SpecError, match="body.3"):
        apply_plan(tiny, Plan({"body.3": [LowRankSpec((3, 3), (1, 1), 1)]}))
    with pytest.raises(SpecError, match="appears twice"):
        Plan.from_dict({"layers": [{"name": "a", "branches": []}, {"name": "a", "branches": []}]})
    with pytest.raises(SpecError):
        Plan.from_json("{not json")
