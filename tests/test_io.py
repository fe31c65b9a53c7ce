import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from svdnas import WeightsError
from svdnas.data.datasets import load_data, read_idx, search_subset
from svdnas.errors import DataError
from svdnas.models.weights import load_weights, read_state_dict
from tests.conftest import tiny_net


class _Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(evil)
    assert not marker.exists()
    # the same payload through torch.save's zip format
    evil2 = tmp_path / "evil2.pth"
    torch.save({"w": _Payload(marker)}, evil2)
    assert not marker.exists()  # saving does not run it
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(evil2)
    assert not marker.exists()


def test_weights_formats_and_mismatch(tmp_path):
    model = tiny_net()
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        fresh = tiny_net()
        torch.nn.init.zeros_(fresh.head.weight)
        load_weights(fresh, tmp_path / name)
        assert torch.equal(fresh.head.weight, model.head.weight)
    bad = dict(state)
    bad["head.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="'head.weight' has shape"):
        load_weights(tiny_net(), tmp_path / "bad.pt")
    del bad["head.weight"]
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="missing key 'head.weight'"):
        load_weights(tiny_net(), tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tiny_net(), tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(tiny_net(), tmp_path / "junk.safetensors")


def test_fmnist_reader(tiny_fmnist):
    data = load_data(f"fmnist:{tiny_fmnist}")
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    x, y = data.train.tensors
    assert x.shape == (600, 1, 28, 28) and y.shape == (600,) and y.max() < 10
    raw = read_idx(tiny_fmnist / "train-images-idx3-ubyte.gz")
    assert raw.dtype == torch.uint8 and raw.shape == (600, 28, 28)
    assert load_data("none") is None
    with pytest.raises(DataError, match="not found"):
        load_data(f"fmnist:{tiny_fmnist}/missing")
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("cifar")


def test_a_fashion_mnist_folder_named_in_the_environment_is_not_replaced_by_another(tiny_fmnist, tmp_path, monkeypatch):
    from svdnas.data import datasets

    monkeypatch.setattr(datasets, "FMNIST_DEFAULT_DIR", str(tiny_fmnist))  # the fallback exists...
    monkeypatch.setenv("SVDNAS_FMNIST", str(tmp_path / "typo"))  # ...but the user named another folder
    with pytest.raises(DataError, match=r"typo \(\$SVDNAS_FMNIST\): no such folder"):
        load_data("fmnist")
    monkeypatch.setenv("SVDNAS_FMNIST", str(tiny_fmnist))
    assert load_data("fmnist").train.tensors[0].shape[0] == 600
    monkeypatch.delenv("SVDNAS_FMNIST")
    assert load_data("fmnist").name == f"fmnist:{tiny_fmnist}"  # unset: the default folder


def test_search_subset_is_fixed_by_seed_and_kept_apart(tiny_fmnist):
    data = load_data(f"fmnist:{tiny_fmnist}")
    a, ia = search_subset(data.train, 100, seed=3)
    _, ib = search_subset(data.train, 100, seed=3)
    _, ic = search_subset(data.train, 100, seed=4)
    assert torch.equal(ia, ib) and not torch.equal(ia, ic)
    assert len(ia) == len(set(ia.tolist())) == len(a) == 100
    x, y = data.train.tensors
    assert all(torch.equal(a[k][0], x[i]) and a[k][1] == y[i] for k, i in enumerate(ia.tolist()))  # the subset holds those images
    proxy, ip = search_subset(data.train, 50, seed=3, exclude=ia)
    assert not set(ip.tolist()) & set(ia.tolist()) and len(proxy) == 50
    with pytest.raises(DataError, match="only"):
        search_subset(data.train, 10_000, seed=0)


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (300 + 20 * i, 260), color).save(tmp_path / split / cls / f"{i}.jpg")
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.num_classes == 2 and data.input_shape == (3, 224, 224) and len(data.train) == 4
    x, y = data.test[3]
    assert x.shape == (3, 224, 224) and y == 1
    assert x[2].mean() > 1.5 and x[0].mean() < -1.5  # blue image, ImageNet-normalised
    with pytest.raises(DataError, match="needs"):
        load_data(f"imagefolder:{tmp_path}/train")


def test_torchvision_spec_without_torchvision_is_a_clear_error():
    from svdnas.errors import SpecError
    from svdnas.models.build import build_model

    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(SpecError, match="needs an importable torchvision"):
            build_model("torchvision:resnet18")
    else:
        model, _ = build_model("torchvision:resnet18")
        assert sum(p.numel() for p in model.parameters()) == 11_689_512


def _write_compressed_run(out, rank: int, report: dict) -> None:
    import copy

    from svdnas import LowRankSpec, Plan, apply_plan
    from svdnas.runs.directory import write_run

    plan = Plan({"body.0": [LowRankSpec((3, 1), (1, 1), rank)], "body.4": []})
    write_run(out, apply_plan(copy.deepcopy(tiny_net()), plan), plan, "python:model", (1, 28, 28), report)


def test_disk_full_names_the_file_and_keeps_earlier_results(tmp_path, monkeypatch):
    """A full disk while writing report.json: the files written before it are complete, the
    earlier report.json is intact, no temporary file is left, and the error names the file."""
    import errno
    import os

    import svdnas
    from svdnas.errors import SvdnasError, WriteError

    _write_compressed_run(tmp_path, 2, {"run": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 4:  # model.safetensors, architecture.json, plan.json, then report.json
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WriteError) as info:
        _write_compressed_run(tmp_path, 3, {"run": 2})
    assert str(info.value) == f"cannot write {tmp_path / 'report.json'}: No space left on device"
    assert isinstance(info.value, OSError) and isinstance(info.value, SvdnasError) and info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary file left
    assert (tmp_path / "report.json").read_bytes() == before["report.json"]
    assert (tmp_path / "plan.json").read_bytes() != before["plan.json"]  # written in full before the failure
    model = svdnas.load(str(tmp_path), base_model=tiny_net())
    assert model.body[0].branches[0].spec.rank == 3


def test_read_only_run_directory(tmp_path):
    import os

    from svdnas.errors import WriteError
    from svdnas.fileio import atomic_write_json

    if os.geteuid() == 0:
        pytest.skip("root writes into any directory whatever its permissions")
    atomic_write_json(tmp_path / "plan.json", {"layers": []})
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'plan.json'}: Permission denied"):
            atomic_write_json(tmp_path / "plan.json", {"layers": [1]})
    finally:
        tmp_path.chmod(0o700)
    assert (tmp_path / "plan.json").read_text() == '{\n "layers": []\n}\n'


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from svdnas.fileio import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    state = tiny_net().state_dict()
    state["body.4.weight"][2, 3] = float("-inf")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inf.safetensors")
    with pytest.raises(WeightsError, match=r"inf.safetensors: 'body.4.weight' holds inf \(1 of 384 values\)"):
        load_weights(tiny_net(), tmp_path / "inf.safetensors")
    state["body.4.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "both.pt")
    with pytest.raises(WeightsError, match=r"'body.4.weight' holds NaN and inf \(2 of 384 values\)"):
        load_weights(tiny_net(), tmp_path / "both.pt")


def test_corrupt_pt_files_are_one_line_errors(tmp_path):
    import io

    buf = io.BytesIO()
    torch.save(tiny_net().state_dict(), buf)
    (tmp_path / "half.pt").write_bytes(buf.getvalue()[:1000])
    (tmp_path / "text.pt").write_text("hello\n")
    for name in ("half.pt", "text.pt"):
        with pytest.raises(WeightsError, match="not a plain weights file") as info:
            read_state_dict(tmp_path / name)
        assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_evaluation_is_remembered_per_model_and_data(tmp_path, monkeypatch):
    from svdnas.data import evaluate as ev

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(30, 3, 2, 2), torch.randint(0, 7, (30,)))
    cache = tmp_path / "evaluations.json"
    first, cached = ev.evaluate_cached(model, data, cache=cache)
    assert not cached and first == ev.evaluate(model, data)
    again, cached = ev.evaluate_cached(model, data, cache=cache)
    assert cached and again == first
    with torch.no_grad():  # other weights: measured again
        model[1].bias.add_(1.0)
    _, cached = ev.evaluate_cached(model, data, cache=cache)
    assert not cached
    other = torch.utils.data.TensorDataset(data.tensors[0] + 1, data.tensors[1])  # other images: measured again
    _, cached = ev.evaluate_cached(model, other, cache=cache)
    assert not cached
    monkeypatch.setenv("SVDNAS_EVAL_CACHE", "0")
    _, cached = ev.evaluate_cached(model, data, cache=cache)
    assert not cached
