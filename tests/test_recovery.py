"""Synthetic images from BatchNorm statistics, distillation, and the recovery modes of compress/finetune."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from svdnas.errors import DataError, SpecError
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.distill import FinetuneConfig, NonFiniteError, augment, distill, distill_loss, layer_mse
from svdnas.recovery.recover import split_synthetic
from svdnas.recovery.synthetic import (
    SynthConfig,
    SyntheticSet,
    batch_losses,
    generate,
    load_synthetic,
    save_synthetic,
    statistics_loss,
)
from svdnas.search import SearchConfig
from tests.conftest import TinyNet, run_cli

FAST = SynthConfig(num=40, batch_size=16, iterations=30, lr=0.2)


def test_statistics_loss_matches_hand_computation():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(5, 3, 4, 4) * 1.5 + 0.3
    mean = x.mean((0, 2, 3))
    std = (x.var((0, 2, 3), unbiased=False) + bn.eps).sqrt()
    per_channel = (mean - bn.running_mean) ** 2 + (std - (bn.running_var + bn.eps).sqrt()) ** 2
    prior = (x.flatten(2).mean(2) ** 2 + (x.flatten(2).std(2) - 1) ** 2).sum(1).mean()
    for channel_mean, reduce in ((True, per_channel.mean()), (False, per_channel.sum())):
        cfg = SynthConfig(image_weight=0.7, channel_mean=channel_mean)
        got = statistics_loss(bn, [("bn", bn)], x, cfg)
        torch.testing.assert_close(got, reduce + 0.7 * prior)


def test_generation_lowers_the_loss_and_is_reproducible(trained_tiny):
    model, _ = trained_tiny
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    assert all(flags)  # the trained model's parameters, as the caller left them
    a = generate(model, (1, 28, 28), FAST, seed=3)
    b = generate(model, (1, 28, 28), FAST, seed=3)
    assert a.images.shape == (40, 1, 28, 28) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images)
    for curve in a.meta["loss"]:
        assert curve[-1] < 0.5 * curve[0]
    # the model comes back as it was given: trainable, same weights (running statistics included), eval mode
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not model.training


def test_killed_generation_resumes_to_the_same_images(trained_tiny, tmp_path):
    model, _ = trained_tiny
    whole = generate(model, (1, 28, 28), FAST, seed=1)

    def die(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, (1, 28, 28), FAST, seed=1, workdir=tmp_path / "w", progress=die)
    assert len(list((tmp_path / "w").glob("batch-*.safetensors"))) == 2
    resumed = generate(model, (1, 28, 28), FAST, seed=1, workdir=tmp_path / "w")
    assert torch.equal(whole.images, resumed.images)
    with pytest.raises(SpecError, match="different generation"):
        generate(model, (1, 28, 28), FAST, seed=2, workdir=tmp_path / "w")


def test_parallel_batches_make_the_images_of_one_batch_at_a_time(trained_tiny, tmp_path):
    model, _ = trained_tiny
    cfg = SynthConfig(num=56, batch_size=16, iterations=12, lr=1.0, patience=1)  # 3 full batches and one of 8
    alone = generate(model, (1, 28, 28), cfg, seed=4)
    together = generate(model, (1, 28, 28), dataclasses.replace(cfg, parallel=2), seed=4)
    torch.testing.assert_close(together.images, alone.images, atol=1e-4, rtol=1e-4)
    for a, b in zip(alone.meta["loss"], together.meta["loss"]):
        assert b == pytest.approx(a, rel=1e-4)
    # the plateau schedule acts within these 12 steps (without it the images differ), so the match covers it
    no_drop = generate(model, (1, 28, 28), dataclasses.replace(cfg, patience=100), seed=4)
    assert (no_drop.images - alone.images).abs().max() > 1e-2

    def die(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, (1, 28, 28), dataclasses.replace(cfg, parallel=2), seed=4, workdir=tmp_path / "w", progress=die)
    resumed = generate(model, (1, 28, 28), dataclasses.replace(cfg, parallel=3), seed=4, workdir=tmp_path / "w")
    torch.testing.assert_close(resumed.images, alone.images, atol=1e-4, rtol=1e-4)
    with pytest.raises(SpecError, match="parallel"):
        SynthConfig(parallel=0)


def test_batch_losses_are_each_batch_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)).eval()
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(3 * 5, 2, 6, 6)
    cfg = SynthConfig(image_weight=0.3)
    together = batch_losses(model, bns, x, cfg, 3)
    alone = torch.stack([statistics_loss(model, bns, part, cfg) for part in x.split(5)])
    torch.testing.assert_close(together, alone)
    assert len(set(together.tolist())) == 3


def test_save_and_load_in_shards(tmp_path):
    images = torch.randn(10, 1, 4, 4)
    cfg = SynthConfig(num=10, shard_size=4)
    paths = save_synthetic(tmp_path / "s.safetensors", SyntheticSet(images, {"format": "svdnas-synthetic/1", "config": vars(cfg), "loss": []}))
    assert [p.name for p in paths] == [f"s-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert torch.equal(load_synthetic(tmp_path / "s.safetensors").images, images)
    paths[1].unlink()
    with pytest.raises(DataError, match="cannot read synthetic shard"):
        load_synthetic(tmp_path / "s.safetensors")
    with pytest.raises(DataError, match="missing"):
        load_synthetic(tmp_path / "other.safetensors")


def test_augment_flips_and_shifts_within_bounds_reproducibly():
    x = torch.zeros(64, 2, 28, 28)
    x[:, :, 10, 5] = 1.0  # one bright pixel, left of the centre
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    where = [(o[0] == 1).nonzero().tolist() for o in out]  # replicated edges are 0 here: the pixel stays single
    assert all(len(w) == 1 for w in where)
    rows = {w[0][0] for w in where}
    cols = {w[0][1] for w in where}
    assert rows <= set(range(8, 13)) and len(rows) > 1  # shifted by up to round(28 / 14) = 2
    mirrored = 27 - 5
    assert any(c >= mirrored - 2 for c in cols) and any(c <= 5 + 2 for c in cols)  # some flipped, some not
    const = torch.full((4, 1, 12, 12), 0.3)
    assert torch.equal(augment(const, torch.Generator().manual_seed(1)), const)  # edges replicated, nothing invented


def test_augment_is_off_by_default_and_never_touches_synthetic_images(trained_tiny, monkeypatch):
    import svdnas.recovery.distill as distill_module

    assert not FinetuneConfig(mode="few-shot").augment and not FinetuneConfig(mode="full").augment
    calls = []
    monkeypatch.setattr(distill_module, "augment", lambda x, g: calls.append(len(x)) or x)
    model, _ = trained_tiny
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    for mode, want in (("synthetic", 0), ("few-shot", 32)):
        calls.clear()
        config = FinetuneConfig(mode=mode, epochs=1, batch_size=16, augment=True)
        distill(copy.deepcopy(model), model, ["body.0", "body.4"], data, data, config)
        assert sum(calls) == want


def test_split_keeps_parts_apart():
    s = SyntheticSet(torch.arange(20.0).view(20, 1, 1, 1), {})
    parts = split_synthetic(s, 3, 5)
    assert (len(parts.train), len(parts.val), len(parts.test)) == (12, 3, 5)
    assert torch.equal(torch.cat([parts.train, parts.val, parts.test]), s.images)
    with pytest.raises(SpecError):
        split_synthetic(s, 10, 10)


def test_few_shot_loss_reduces_to_ce_when_student_equals_teacher():
    z = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    out = {"a": torch.randn(6, 3)}
    cfg = FinetuneConfig(mode="few-shot")
    got = distill_loss("few-shot", z, z.clone(), out, {"a": out["a"].clone()}, y, cfg)
    torch.testing.assert_close(got, 0.05 * nn.functional.cross_entropy(z, y))
    plain = FinetuneConfig(mode="synthetic", layer_loss="plain")
    torch.testing.assert_close(distill_loss("synthetic", z, z, {"a": out["a"] + 1}, out, y, plain), torch.tensor(1.0))
    relative = FinetuneConfig(mode="synthetic")  # the default
    shifted = distill_loss("synthetic", z, z, {"a": out["a"] + 1}, out, y, relative)
    torch.testing.assert_close(shifted, 1.0 / out["a"].pow(2).mean())


def test_learning_rate_defaults_by_mode():
    assert [FinetuneConfig(mode=m).resolved().lr for m in ("synthetic", "few-shot", "full")] == [1e-2, 1e-2, 1e-3]
    assert FinetuneConfig(mode="few-shot", lr=1e-3).resolved().lr == 1e-3  # the paper's, when asked for
    with pytest.raises(SpecError, match="lr"):
        FinetuneConfig(lr=0.0)


def test_relative_layer_loss_does_not_depend_on_the_activations_scale():
    s, t = torch.randn(8, 4, 5, 5), torch.randn(8, 4, 5, 5)
    for k in (0.01, 1.0, 30.0):
        torch.testing.assert_close(layer_mse(k * s, k * t), layer_mse(s, t))
    torch.testing.assert_close(layer_mse(30 * s, 30 * t, "plain"), 900 * layer_mse(s, t, "plain"))
    torch.testing.assert_close(layer_mse(t.clone(), t), torch.tensor(0.0))
    with pytest.raises(SpecError, match="layer loss"):
        FinetuneConfig(layer_loss="l1")


def _compressed(model):
    import copy

    from svdnas.lowrank.plan import Plan
    from svdnas.lowrank.spec import LowRankSpec
    from svdnas.surgery.swap import apply_plan

    plan = Plan({"body.0": [LowRankSpec((3, 1), (1, 1), 2)], "body.4": [LowRankSpec((1, 1), (1, 1), 3)]})
    return apply_plan(copy.deepcopy(model), plan), plan


def _layer_error(student, teacher, x):
    from svdnas.recovery.distill import _Outputs

    hs, ht = _Outputs(student, ["body.4"]), _Outputs(teacher, ["body.4"])
    with torch.no_grad():
        student(x), teacher(x)
    err = nn.functional.mse_loss(hs.out["body.4"], ht.out["body.4"]).item()
    hs.remove(), ht.remove()
    return err


def test_synthetic_distillation_brings_layers_back(trained_tiny):
    model, data = trained_tiny
    student, _ = _compressed(model)
    x = data.test.tensors[0][:200]
    before = _layer_error(student, model, x)
    synth = generate(model, (1, 28, 28), SynthConfig(num=96, batch_size=32, iterations=40, lr=0.2), seed=0)
    parts = split_synthetic(synth, 16, 16)
    train = torch.utils.data.TensorDataset(parts.train, torch.zeros(len(parts.train), dtype=torch.long))
    val = torch.utils.data.TensorDataset(parts.val, torch.zeros(len(parts.val), dtype=torch.long))
    hist = distill(student, model, ["body.0", "body.4"], train, val, FinetuneConfig(mode="synthetic", epochs=15, batch_size=16))
    assert hist.metric == "agreement" and len(hist.val) >= 1
    assert _layer_error(student, model, x) < 0.7 * before  # measured on real images it never saw


def test_schedule_drops_the_rate_and_stops(trained_tiny):
    model, data = trained_tiny
    student, _ = _compressed(model)
    x, y = data.train.tensors
    train = torch.utils.data.TensorDataset(x[:64], y[:64])
    val = torch.utils.data.TensorDataset(x[64:96], y[64:96])
    cfg = FinetuneConfig(mode="few-shot", epochs=50, lr=2e-4, patience=0, batch_size=64)  # too small a rate to improve much
    hist = distill(student, model, ["body.0", "body.4"], train, val, cfg)
    assert hist.lr[0] == pytest.approx(2e-4)
    assert len(hist.epoch) < 50 and "learning rate below" in hist.stopped


def test_non_finite_loss_stops_with_the_step(trained_tiny, tmp_path):
    model, data = trained_tiny
    student, _ = _compressed(model)
    with torch.no_grad():
        student.head.weight[0, 0] = float("nan")
    x, y = data.train.tensors
    ds = torch.utils.data.TensorDataset(x[:32], y[:32])
    with pytest.raises(NonFiniteError, match="epoch 1, step 1"):  # no restarts: the first non-finite loss stops
        distill(copy.deepcopy(student), model, ["body.4"], ds, ds, FinetuneConfig(mode="full", epochs=2, batch_size=32, collapse=0))
    # with restarts, the run goes back to its best state at a tenth of the rate; that state is broken
    # too, and once the rate would fall below min_lr the run stops with the error
    with pytest.raises(NonFiniteError, match="epoch 2, step 1"):
        distill(student, model, ["body.4"], ds, ds, FinetuneConfig(mode="full", epochs=4, batch_size=32, lr=1e-3, min_lr=1e-4))


def test_a_collapse_restarts_from_the_best_state_at_a_lower_rate(trained_tiny):
    model, data = trained_tiny
    x, y = data.train.tensors
    train, val = torch.utils.data.TensorDataset(x[:256], y[:256]), torch.utils.data.TensorDataset(x[256:384], y[256:384])
    student, _ = _compressed(model)
    from svdnas.recovery.distill import _top1

    start = _top1(student, val, "cpu")
    cfg = FinetuneConfig(mode="few-shot", epochs=6, batch_size=64, lr=30.0, min_lr=1e-4, patience=10)  # far too high a rate
    hist = distill(student, model, ["body.0", "body.4"], train, val, cfg)
    assert hist.restarts and hist.restarts[0]["epoch"] == 1 and hist.restarts[0]["new_lr"] == pytest.approx(3.0)
    assert [r["new_lr"] for r in hist.restarts] == sorted((r["new_lr"] for r in hist.restarts), reverse=True)
    assert hist.lr[len(hist.restarts)] < 30.0  # the epochs after a restart run at the lower rate
    distill_score = _top1(student, val, "cpu")
    assert distill_score >= start  # the best state is what comes back, never the collapsed one
    with pytest.raises(NonFiniteError):  # without restarts the same rate ends the run
        distill(_compressed(model)[0], model, ["body.0", "body.4"], train, val, dataclasses.replace(cfg, collapse=0, epochs=2))
    with pytest.raises(SpecError, match="collapse"):
        FinetuneConfig(collapse=-1)


def test_killed_finetuning_resumes_to_the_same_weights(trained_tiny, tmp_path):
    model, data = trained_tiny
    x, y = data.train.tensors
    train, val = torch.utils.data.TensorDataset(x[:128], y[:128]), torch.utils.data.TensorDataset(x[128:192], y[128:192])
    cfg = FinetuneConfig(mode="few-shot", epochs=4, batch_size=32, lr=1e-3)
    ref, _ = _compressed(model)
    distill(ref, model, ["body.0", "body.4"], train, val, cfg, seed=5)

    def die(done, total):
        if done == 9:  # in the third epoch
            raise KeyboardInterrupt

    student, _ = _compressed(model)
    ckpt = tmp_path / "ft.pt"
    with pytest.raises(KeyboardInterrupt):
        distill(student, model, ["body.0", "body.4"], train, val, cfg, seed=5, checkpoint=ckpt, progress=die)
    student, _ = _compressed(model)
    with pytest.raises(SpecError, match="different fine-tuning run"):  # another layer term is another run
        distill(student, model, ["body.0", "body.4"], train, val, FinetuneConfig(mode="few-shot", epochs=4, batch_size=32, layer_loss="plain"),
                seed=5, checkpoint=ckpt)
    student, _ = _compressed(model)
    hist = distill(student, model, ["body.0", "body.4"], train, val, cfg, seed=5, checkpoint=ckpt)
    assert hist.epoch == [1, 2, 3, 4]
    for (k, a), b in zip(ref.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def _config(mode, **kw):
    base = {
        "reduction": 0.5, "search_images": 100, "proxy_images": 32, "mode": mode,
        "search": SearchConfig(epochs=2, batch_size=50, target=0.5),
        "finetune": FinetuneConfig(mode="synthetic" if mode == "data-free" else mode, epochs=3, shots=100, val_images=100, batch_size=50, lr=3e-4),
        "synth": SynthConfig(num=200, batch_size=50, iterations=20, lr=0.2), "synth_val": 32, "synth_test": 32,
    }
    base.update(kw)
    return CompressConfig(**base)


@pytest.mark.parametrize("mode", ["few-shot", "synthetic"])
def test_compress_with_recovery(trained_tiny, tmp_path, mode):
    import svdnas

    model, data = trained_tiny
    result = compress(model, data, _config(mode), filter_fn="convs+linear", out=tmp_path)
    r = result.report
    assert r["mode"] == mode and r["recovery"]["mode"] == mode
    # the accuracy after recovery is that of the saved, recovered model on the whole test split
    x, y = data.test.tensors
    with torch.no_grad():
        reference = 100.0 * (svdnas.load(str(tmp_path), base_model=TinyNet()).eval()(x).argmax(1) == y).double().mean().item()
    assert r["recovery"]["after"]["top1"] == pytest.approx(reference, abs=1e-9)
    assert r["top1"]["compressed"] == pytest.approx(reference, abs=1e-9)
    assert "before" in r["recovery"] and r["seconds"]["finetune"] > 0
    assert r["flops"]["reduction"] >= 0.49
    if mode == "synthetic":
        assert (tmp_path / "synthetic.safetensors").is_file() and not (tmp_path / "synthetic.partial").exists()
        assert r["synthetic"]["images"] == {"train": 136, "val": 32, "test": 32}
        assert len(r["synthetic"]["loss_per_iteration"]) == 20
        assert 0 <= r["fidelity"]["top1_agreement"] <= 100


def test_data_free_reads_no_real_image(trained_tiny, tmp_path):
    model, _ = trained_tiny
    r = compress(model, None, _config("data-free"), input_shape=(1, 28, 28), filter_fn="convs+linear", out=tmp_path).report
    assert r["top1"] is None and r["top5"] is None
    assert r["data"]["spec"] == "none" and "synthetic" in r["data"]["search_split"]
    assert r["fidelity"]["images"] == 32 and r["fidelity"]["top1_agreement"] > 10
    with pytest.raises(DataError, match="data-free"):
        compress(model, None, _config("few-shot"), input_shape=(1, 28, 28))


def test_data_free_shares_too_few_synthetic_images_between_search_and_proxy(trained_tiny, caplog):
    from svdnas.pipeline.images import synthetic_search_images
    from svdnas.recovery.recover import SyntheticSplits

    model, _ = trained_tiny
    images = torch.randn(130, 1, 28, 28)
    splits = SyntheticSplits(images, images[:4], images[:4], {})

    def sizes(**kw):
        search, proxy = synthetic_search_images(model, splits, _config("data-free", **kw), "cpu")
        return len(search), len(proxy)

    assert sizes(search_images=100, proxy_images=30) == (100, 30)  # enough for both: as asked
    assert "for the proxy" not in caplog.text
    # 130 for 200 + 32: in proportion (the proxy used to get the 0 left after the search, then reuse search images)
    assert sizes(search_images=200, proxy_images=32) == (112, 18) and "112 for the search and 18 for the proxy" in caplog.text
    assert sizes(search_images=100, proxy_images=100) == (65, 65)


def test_model_without_batchnorm_is_refused_before_the_search(trained_tiny):
    _, data = trained_tiny
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    plain(torch.zeros(1, 1, 28, 28))
    with pytest.raises(DataError, match="no BatchNorm.*post-training, few-shot or full"):
        compress(plain, data, _config("synthetic"), filter_fn="convs")


def test_cli_synth_then_finetune(tiny_module, tiny_fmnist, tmp_path):
    spec, weights = tiny_module
    data = f"fmnist:{tiny_fmnist}"
    out = tmp_path / "s.safetensors"
    p = run_cli("synth", spec, "--weights", str(weights), "--input-shape", "1,28,28", "--num", "64", "--out", str(out),
             "--synth-iterations", "5", "--synth-batch-size", "32", "--synth-parallel", "2")
    assert p.returncode == 0, p.stderr
    made = load_synthetic(out)
    assert made.images.shape == (64, 1, 28, 28) and made.meta["config"]["parallel"] == 2
    p = run_cli("synth", spec, "--weights", str(weights), "--input-shape", "1,28,28", "--num", "64", "--out", str(out))
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "--overwrite" in p.stderr

    run = tmp_path / "run"
    p = run_cli("compress", spec, "--weights", str(weights), "--data", data, "--reduction", "0.5", "--out", str(run),
             "--filter", "convs+linear", "--epochs", "2", "--search-images", "100", "--quiet")
    assert p.returncode == 0, p.stderr
    ft = tmp_path / "ft"
    p = run_cli("finetune", str(run), "--data", data, "--mode", "synthetic", "--out", str(ft), "--synthetic", str(out),
             "--synth-val", "16", "--synth-test", "16", "--finetune-epochs", "2", "--teacher", spec, "--teacher-weights", str(weights),
             "--allow-code")
    assert p.returncode == 0, p.stderr
    r = json.loads((ft / "report.json").read_text())
    assert r["mode"] == "synthetic" and r["recovery"]["history"]["epoch"] == [1, 2]
    # fine-tuning keeps the architecture: the same plan, and the report's layers are its layers
    plan = json.loads((run / "plan.json").read_text())["layers"]
    assert (ft / "plan.json").read_text() == (run / "plan.json").read_text()
    assert [(x["name"], x["branches"]) for x in r["layers"]] == [(x["name"], x["branches"]) for x in plan] and plan
    assert r["recovery"]["config"]["augment"] is False  # off unless asked for
    assert r["recovery"]["config"]["layer_loss"] == "relative"  # the default

    p = run_cli("finetune", str(run), "--data", data, "--mode", "few-shot", "--out", str(tmp_path / "fs"), "--shots", "64",
             "--val-images", "32", "--finetune-epochs", "1", "--augment", "--layer-loss", "plain", "--teacher", spec,
             "--teacher-weights", str(weights), "--allow-code")
    assert p.returncode == 0, p.stderr
    config = json.loads((tmp_path / "fs" / "report.json").read_text())["recovery"]["config"]
    assert config["augment"] is True and config["layer_loss"] == "plain"


def test_cli_synth_refuses_a_model_without_batchnorm(tmp_path):
    factory = tmp_path / "plain.py"
    factory.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())\n")
    p = run_cli("synth", f"module:{factory}:make", "--input-shape", "1,8,8", "--num", "4", "--out", str(tmp_path / "x.safetensors"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no BatchNorm" in lines[0] and "Traceback" not in p.stderr


@pytest.mark.slow
def test_torchrun_finetune_writes_one_run(tiny_module, tiny_fmnist, tmp_path):
    import shutil

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    spec, weights = tiny_module
    data = f"fmnist:{tiny_fmnist}"
    run = tmp_path / "run"
    p = run_cli("compress", spec, "--weights", str(weights), "--data", data, "--reduction", "0.5", "--out", str(run),
             "--filter", "convs", "--epochs", "2", "--search-images", "100", "--quiet")
    assert p.returncode == 0, p.stderr
    launcher = [str(torchrun)] if torchrun.exists() else ["torchrun"]
    ft = ["finetune", str(run), "--data", data, "--mode", "few-shot", "--shots", "128", "--val-images", "64",
          "--finetune-epochs", "2", "--finetune-lr", "3e-4", "--teacher", spec, "--teacher-weights", str(weights),
          "--allow-code", "--device", "cpu", "--quiet"]
    r = subprocess.run([*launcher, "--nproc_per_node", "2", "--master_port", "29519", "-m", "svdnas", *ft, "--out", str(tmp_path / "ddp")],
                       check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("run directory") == 1
    one = run_cli(*ft, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ddp", "one"))
    assert a["recovery"]["history"]["epoch"] == b["recovery"]["history"]["epoch"] == [1, 2]
    # the processes average their gradients over halves of each batch: one process's loss, up to rounding
    for x, y in zip(a["recovery"]["history"]["loss"], b["recovery"]["history"]["loss"]):
        assert x == pytest.approx(y, rel=1e-3)
