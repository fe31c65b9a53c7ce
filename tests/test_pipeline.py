import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdnas
from svdnas.errors import BudgetError, SpecError
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig
from tests.conftest import TinyNet, run_cli, run_cli_process


def _top1(model, dataset) -> float:
    """Top-1 in percent, by hand: the reference the report's accuracies are checked against."""
    x, y = dataset.tensors
    with torch.no_grad():
        return 100.0 * (model.eval()(x).argmax(1) == y).double().mean().item()


def _vm_hwm_mib() -> float:
    """This process's peak resident memory so far, read from the kernel."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10


def _config(**kw):
    base = {"reduction": 0.5, "search_images": 200, "proxy_images": 64, "search": SearchConfig(epochs=3, batch_size=64, target=0.5)}
    base.update(kw)
    return CompressConfig(**base)


@pytest.mark.parametrize(("objective", "reduction"), [("flops", 0.6), ("params", 0.3)])  # each objective, each end of the range
def test_budget_is_met(trained_tiny, objective, reduction, tmp_path):
    model, data = trained_tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hwm_before = _vm_hwm_mib() if Path("/proc/self/status").is_file() else None
    result = compress(model, data, _config(reduction=reduction, objective=objective), filter_fn="convs+linear", out=tmp_path)
    r = result.report
    assert r[objective]["reduction"] >= reduction - 0.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    for name in ("model.safetensors", "architecture.json", "plan.json", "report.json", "history.json"):
        assert (tmp_path / name).is_file()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [layer["name"] for layer in plan["layers"]] == ["stem", "body.0", "body.4", "head"]
    loaded = svdnas.load(str(tmp_path), base_model=TinyNet())
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    # the accuracies are those of the original and the compressed model on the whole test split
    assert r["top1"]["original"] == pytest.approx(_top1(model, data.test), abs=1e-9)
    assert r["top1"]["compressed"] == pytest.approx(_top1(result.model, data.test), abs=1e-9)
    assert r["data"]["search_images"] == 200 and r["seconds"]["total"] > 0
    assert set(r["peak_memory_mib"]) == set(r["seconds"])
    if hwm_before is not None:  # each stage's peak lies between the kernel's peak before and after the run
        peaks = [r["peak_memory_mib"][stage]["rss"] for stage in r["seconds"]]
        assert hwm_before - 1 <= min(peaks) and max(peaks) <= _vm_hwm_mib() + 1, (hwm_before, peaks)


def test_two_sample_mode_and_beta(trained_tiny):
    model, data = trained_tiny
    result = compress(model, data, _config(search=SearchConfig(epochs=2, batch_size=64, sampling="two", target=0.5)), filter_fn="convs")
    assert result.report["sampling"] == "two" and result.report["flops"]["reduction"] >= 0.49
    assert result.report["search_dtype"] is None  # the two-sample scheme runs every candidate at full precision
    result = compress(model, data, _config(search=SearchConfig(epochs=2, batch_size=64, window_dtype="bfloat16", target=0.5)), filter_fn="convs")
    assert result.report["search_dtype"] == "bfloat16" and result.report["flops"]["reduction"] >= 0.49
    result = compress(model, data, _config(reduction=None, beta=8.0), filter_fn="convs")
    assert result.report["beta"] == 8.0 and len(result.history["loss"]) == 3


def test_unreachable_budget_and_bad_configs(trained_tiny):
    model, data = trained_tiny
    with pytest.raises(BudgetError, match="even rank 1 in every target layer removes at most"):
        compress(model, data, _config(reduction=0.97), filter_fn="pointwise")
    with pytest.raises(SpecError, match="no layer"):
        compress(model, data, _config(), filter_fn=lambda m, n: False)
    with pytest.raises(SpecError, match="exactly one"):
        CompressConfig(reduction=0.5, beta=4.0)
    with pytest.raises(SpecError, match="search dtype must be auto, float32 or bfloat16"):
        SearchConfig(target=0.5, window_dtype="float16")
    with pytest.raises(SpecError, match=r"\(0, 1\)"):
        CompressConfig(reduction=1.5)
    with pytest.raises(SpecError, match="--calibration-patches must be 0"):
        CompressConfig(reduction=0.5, calibration_patches=-1)


def test_same_seed_same_plan(trained_tiny):
    model, data = trained_tiny
    small = _config(search_images=100, search=SearchConfig(epochs=2, batch_size=50, target=0.5))
    a = compress(model, data, small, filter_fn="convs+linear", seed=3)
    b = compress(model, data, small, filter_fn="convs+linear", seed=3)
    assert a.plan == b.plan
    # not only the same choice: the same search, step for step (the noise and the search images are seeded)
    for key in ("loss", "ce", "expected_cost_ratio", "multiplier"):
        assert a.history[key] == b.history[key], key


def test_compress_command_line(tiny_module, tiny_fmnist, trained_tiny, tmp_path):
    spec, weights = tiny_module
    out = tmp_path / "run"
    args = ["compress", spec, "--weights", weights, "--data", f"fmnist:{tiny_fmnist}", "--reduction", "0.5", "--out", out,
            "--epochs", "2", "--search-images", "200", "--filter", "convs", "--device", "cpu", "--quiet"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["reduction"] >= 0.49
    for name in ("report.md", "layers.png", "history.png"):  # compress writes the report at the end
        assert (out / name).stat().st_size > 0
    table = (out / "report.md").read_text()
    assert "`body.0`" in table and "`body.4`" in table and "left alone: `body.3`" in table
    again = run_cli(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    both = run_cli(*args, "--beta", "4", "--overwrite")
    assert both.returncode == 2 and "not both" in both.stderr
    ev = run_cli("eval", out, "--data", f"fmnist:{tiny_fmnist}", "--json", "--allow-code")
    assert ev.returncode == 0, ev.stderr
    top1 = json.loads(ev.stdout.strip().splitlines()[-1])["top1"]
    _, data = trained_tiny
    reference = _top1(svdnas.load(str(out), base_model=TinyNet()), data.test)  # the saved model, evaluated here
    assert top1 == pytest.approx(reference, abs=1e-9) and report["top1"]["compressed"] == pytest.approx(reference, abs=1e-9)


@pytest.mark.slow
def test_entry_point_in_a_process_of_its_own(tiny_module, tiny_fmnist, tmp_path):
    """``python -m svdnas`` end to end: the run directory it writes evaluates, in a second process,
    to the top-1 its report holds."""
    spec, weights = tiny_module
    out = tmp_path / "run"
    r = run_cli_process("compress", spec, "--weights", weights, "--data", f"fmnist:{tiny_fmnist}", "--reduction", "0.5",
                        "--out", out, "--epochs", "1", "--search-images", "100", "--filter", "convs", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    ev = run_cli_process("eval", out, "--data", f"fmnist:{tiny_fmnist}", "--json", "--allow-code")
    assert ev.returncode == 0, ev.stderr
    report = json.loads((out / "report.json").read_text())
    assert json.loads(ev.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(report["top1"]["compressed"], abs=1e-9)
    # the defaults as a user gets them (the suite's own runs skip the timing): candidates timed, plan checked
    assert report["slower_candidates"]["measured"] > 0 and report["plan_check"]["kept"] in ("search", "spectrum", "weighted")


def test_two_branches(trained_tiny, tmp_path):
    model, data = trained_tiny
    result = compress(model, data, _config(reduction=0.4, branches=2), filter_fn="convs", out=tmp_path)
    r = result.report
    assert set(r["branches"]) == {"b1", "b2"}
    assert r["branches"]["b1"]["flops"]["reduction"] >= 0.39 and r["flops"]["reduction"] >= 0.39
    assert any(len(specs) == 2 for specs in result.plan.layers.values())
    for name, specs in result.plan.layers.items():
        if len(specs) == 2:  # the first branch gave up rank, unless it had none to give
            b1 = r["branches"]["b1"]["plan"]["layers"]
            first = next(layer["branches"][0] for layer in b1 if layer["name"] == name)
            assert specs[0].rank < first["rank"] or first["rank"] == 1
    loaded = svdnas.load(str(tmp_path), base_model=TinyNet())
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert set(hist) == {"b1", "b2"} and len(hist["b2"]["epoch"]) == 1  # half the first search's 3 epochs


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_module, tiny_fmnist, tmp_path):
    import shutil

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    spec, weights = tiny_module
    common = ["compress", spec, "--weights", str(weights), "--data", f"fmnist:{tiny_fmnist}",
              "--reduction", "0.5", "--epochs", "2", "--search-images", "256", "--filter", "convs", "--device", "cpu", "--quiet",
              # float32 windows: bfloat16 rounds the (slightly different) averaged gradients apart by
              # about 1e-3 in the logits, which would hide what this compares (8e-5 apart; 0.23 without averaging)
              "--search-dtype", "float32",
              # candidates untimed, in the processes as in this one (the suite's default): torchrun's processes
              # run one thread each and would time, and so offer, other candidates than this process
              "--offer-slower"]
    launcher = [str(torchrun)] if torchrun.exists() else ["torchrun"]
    r = subprocess.run([*launcher, "--nproc_per_node", "2", "--master_port", "29517", "-m", "svdnas", *common, "--out", str(tmp_path / "ddp")],
                       check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("run directory") == 1  # only rank 0 prints and writes
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["data"]["processes"] == 2 and report["flops"]["reduction"] >= 0.49
    single = run_cli(*common, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    # same seed: the processes draw the same noise and average their gradients, so the search learns
    # the same logits (up to the rounding of the averaged gradients) and picks the same plan; where
    # the plans differ, the two picks must tie under the one-process logits (rounding decided a tie)
    hist = {k: json.loads((tmp_path / k / "history.json").read_text()) for k in ("ddp", "one")}
    logits = {k: h["logits"] for k, h in hist.items()}
    assert logits["ddp"].keys() == logits["one"].keys() and len(logits["one"]) == 3
    # Adam divides each step by the gradient's running RMS, so a candidate whose gradient is at rounding
    # level (its mixing weight near zero) takes steps of either sign: such logits may move apart by up
    # to lr x steps; all others must agree to 1e-3
    close = total = 0
    for name, ref in logits["one"].items():
        assert len(logits["ddp"][name]) == len(ref), f"{name}: other candidates under torchrun"
        diff = (torch.tensor(logits["ddp"][name]) - torch.tensor(ref)).abs()
        assert float(diff.max()) <= 0.1 * 4, name  # lr 0.1 x 4 steps (2 epochs of 2 batches): Adam's furthest
        close, total = close + int((diff <= 1e-3).sum()), total + diff.numel()
    assert close >= 0.9 * total, f"only {close} of {total} logits agree to 1e-3"
    if (tmp_path / "ddp" / "plan.json").read_text() != (tmp_path / "one" / "plan.json").read_text():
        ref = logits["one"]
        score = {k: sum(ref[n][c] for n, c in h["choice"].items()) for k, h in hist.items()}
        assert hist["ddp"]["choice"] != hist["one"]["choice"]
        assert abs(score["ddp"] - score["one"]) < 5e-3, (score, hist["ddp"]["choice"], hist["one"]["choice"])


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_plan(tiny_module, tiny_fmnist, tmp_path):
    import signal
    import time

    spec, weights = tiny_module
    common = ["compress", spec, "--weights", str(weights),
              "--data", f"fmnist:{tiny_fmnist}", "--reduction", "0.5", "--epochs", "40", "--search-images", "500",
              "--batch-size", "16", "--filter", "convs", "--device", "cpu", "--quiet", "--branches", "2",
              # candidates untimed in the killed process too, as in this one's runs (the suite's default), so
              # that all three offer the same candidates
              "--offer-slower"]
    whole = run_cli(*common, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    # a process of its own, to be killed mid-search
    proc = subprocess.Popen([sys.executable, "-m", "svdnas", *common, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint-b1_search.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists() and any(out.glob("checkpoint-*.pt"))
    again = run_cli(*common, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "plan.json").read_text() == (tmp_path / "whole" / "plan.json").read_text()
    h_whole = json.loads((tmp_path / "whole" / "history.json").read_text())
    h_resumed = json.loads((out / "history.json").read_text())
    assert h_whole["b1"]["loss"] == pytest.approx(h_resumed["b1"]["loss"], rel=1e-5)
    assert not any(out.glob("checkpoint-*.pt"))  # removed once the run finished


def test_proxy_stage_checkpoints_and_a_resumed_run_skips_it(trained_tiny, tmp_path, monkeypatch):
    from svdnas.search import grid_candidates, pruning
    from svdnas.surgery.trace import example_input, trace_layers

    model, data = trained_tiny
    infos = trace_layers(model, example_input(model, (1, 28, 28)))
    cands = {n: grid_candidates(n, model.get_submodule(n), infos[n].input_hw, [0.3, 0.5, 0.7], "flops") for n in ("body.0", "body.4")}
    proxy = torch.utils.data.Subset(data.train, list(range(64)))
    ckpt = tmp_path / "checkpoint-proxy.json"
    stages = []
    first = pruning.proxy_errors(model, cands, proxy, 0.5, "cpu", ckpt, lambda s, d, t: stages.append((s, d, t)))
    assert ckpt.is_file() and stages[-1] == ("proxy", 2, 2)
    assert all(len(errs) > 1 for errs in first.values())

    def boom(*a, **k):
        raise AssertionError("the proxy ran again")

    monkeypatch.setattr(pruning, "capture_inputs", boom)
    again = pruning.proxy_errors(model, cands, proxy, 0.5, "cpu", ckpt, None)
    assert again == first  # same floats, same family keys: the resumed search sees the same space
    with pytest.raises(AssertionError, match="ran again"):  # a checkpoint of another target is not reused
        pruning.proxy_errors(model, cands, proxy, 0.6, "cpu", ckpt, None)
