"""The spectrum allocation's plan and the check that keeps the better of it and the search's."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from svdnas.data.datasets import load_data
from svdnas.lowrank.plan import Plan
from svdnas.pipeline import stages
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig, allocation
from svdnas.search.allocation import better_plan, choices_to_plan, mean_kl, spectrum_scores
from svdnas.search.output_proxy import _nearest, spectrum_errors
from tests.conftest import tiny_net
from tests.test_output_proxy import _setup


def test_spectrum_scores_are_the_proxys_errors_and_grow_with_rank():
    model, _, cands, derivation = _setup()
    scores = spectrum_scores(model, cands, derivation)
    for name, c in cands.items():
        row = scores[name]
        assert len(row) == len(c) and row[0] == 0.0 and all(s <= 0 for s in row)
        read = spectrum_errors(model.get_submodule(name), c, _nearest(c, 0.5, "flops"), derivation)
        for fam, i in _nearest(c, 0.5, "flops").items():
            assert -row[i] == pytest.approx(read[fam])
        for i, a in enumerate(c.specs, start=1):  # a larger rank of the same family never errs more
            for j, b in enumerate(c.specs, start=1):
                if a.family() == b.family() and a.rank < b.rank:
                    assert row[i] <= row[j] + 1e-12


def test_better_plan_keeps_the_one_nearer_the_original():
    model, x, cands, derivation = _setup()
    images = TensorDataset(x.float(), torch.zeros(len(x), dtype=torch.long))
    model = model.float()
    cheapest = {n: min(range(1, len(c)), key=lambda i, c=c: c.macs[i]) for n, c in cands.items()}
    plans = {"rough": choices_to_plan(["0", "2"], cands, cheapest), "none": Plan({"0": [], "2": []}),
             "none again": Plan({"0": [], "2": []})}
    kept, summary = better_plan(model, plans, images, "cpu", derivation)
    assert kept == "none" and summary["kl"]["none"] == pytest.approx(0.0, abs=1e-9) == summary["kl"]["none again"]
    assert summary["kl"]["rough"] > 1e-6 and summary["images"] == len(x)
    assert mean_kl(model, model, images, "cpu") == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("winner", ["search", "spectrum", None])
def test_compress_keeps_the_plan_the_check_prefers(tiny_fmnist, tmp_path, monkeypatch, winner):
    seen = {}

    def rigged(model, plans, images, device, derivation):
        seen.update(plans)
        return winner, {"kl": {k: 0.0 for k in plans}, "kept": winner, "images": len(images)}

    monkeypatch.setattr(stages, "better_plan", rigged if winner else allocation.better_plan)
    config = CompressConfig(reduction=0.4, search_images=200, proxy_images=64, derivation="whitened",
                            search=SearchConfig(epochs=1, batch_size=64, target=0.5))
    result = compress(tiny_net().eval(), load_data(f"fmnist:{tiny_fmnist}"), config, filter_fn="convs+linear", out=tmp_path / "run")
    check = json.loads((tmp_path / "run" / "report.json").read_text())["plan_check"]
    assert result.report["flops"]["reduction"] >= 0.4 - 0.01  # either plan meets the budget
    assert check["seconds"] > 0 and set(check["kl"]) == {"search", "spectrum"}
    if winner:
        assert result.plan.to_json() == seen[winner].to_json()
    else:
        assert check["kept"] in ("search", "spectrum") and check["kl"][check["kept"]] == min(check["kl"].values())


def test_the_check_is_skipped_where_it_is_not_defined(tiny_fmnist, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the plan check ran")

    monkeypatch.setattr(stages, "better_plan", boom)
    data = load_data(f"fmnist:{tiny_fmnist}")
    for kw in ({"derivation": "weight"}, {"derivation": "whitened", "spectrum_plan": False}):
        config = CompressConfig(reduction=0.4, search_images=200, proxy_images=64, search=SearchConfig(epochs=1, batch_size=64, target=0.5), **kw)
        result = compress(tiny_net().eval(), data, config, filter_fn="convs+linear")
        assert "plan_check" not in result.report
