"""Bad input given as a user gives it, on the command line (``svdnas.cli.main`` in this process; one
case in a process of its own): every case ends with exactly one ``error: ...`` line on stderr, a
non-zero exit code and no traceback. A few cases also go through
the Python API, which must raise a subclass of SvdnasError with the same message.

Not covered here: a model without BatchNorm asked for synthetic data (synthetic data is built
elsewhere).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svdnas.errors import SvdnasError
from tests.conftest import CliResult, run_cli, run_cli_process, tiny_net

ROOT = Path(__file__).parents[1]

FACTORIES = '''
import sys
sys.path.insert(0, {root!r})
from torch import nn
from tests.conftest import TinyNet


def tiny():
    return TinyNet()


def rgb():
    return TinyNet(in_chans=3)


class Mixed(nn.Module):
    """Compressible layers beside layers the decomposition does not cover."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.seq = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(self.grouped(self.depthwise(self.stem(x))))
        return self.head(self.seq(x.mean(2)).mean(2))


class Unsupported(Mixed):
    """Nothing but the first conv (never a target by default) and layers not covered."""

    def forward(self, x):
        x = self.grouped(self.depthwise(self.stem(x)))
        return self.head(self.seq(x.mean(2)).mean(2))


def mixed():
    return Mixed()


def unsupported():
    return Unsupported()


def broken():
    raise RuntimeError("the factory failed")


def not_a_module():
    return 42
'''


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def one_error(r: CliResult) -> str:
    """The message of a failed run, after checking the form every failure must take."""
    assert r.returncode != 0, f"exit 0 on bad input; stdout: {r.stdout[-500:]}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line of error output, got {len(lines)}:\n{r.stderr}"
    assert lines[-1].startswith("error: "), r.stderr
    return lines[-1][len("error: "):]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_fmnist) -> dict[str, Path | str]:
    """Model factories, good and bad weights, data folders and run directories to point the CLI at."""
    d = tmp_path_factory.mktemp("bad_input")
    (d / "models.py").write_text(FACTORIES.format(root=str(ROOT)))
    (d / "syntax.py").write_text("def make(:\n")
    state = {k: v.contiguous() for k, v in tiny_net().state_dict().items()}
    save_file(state, d / "tiny.safetensors")

    wrong_shape = dict(state, **{"body.4.weight": torch.zeros(24, 8, 1, 1)})
    save_file(wrong_shape, d / "wrong_shape.safetensors")
    torch.save({k: v for k, v in state.items() if k != "head.bias"}, d / "missing_key.pt")
    torch.save(dict(state, extra=torch.zeros(1)), d / "extra_key.pth")
    nan = dict(state, **{"body.0.weight": state["body.0.weight"].clone()})
    nan["body.0.weight"][3, 1, 0, 2] = float("nan")
    save_file(nan, d / "nan.safetensors")
    inf = dict(state, **{"bn.running_var": state["bn.running_var"].clone()})
    inf["bn.running_var"][0] = float("inf")
    torch.save(inf, d / "inf.pt")

    (d / "junk.safetensors").write_bytes(b"not a safetensors file")
    (d / "junk.pt").write_bytes(b"not a torch file either")
    buf = io.BytesIO()
    torch.save(state, buf)
    (d / "truncated.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "weights.npy").write_bytes(b"\x93NUMPY")
    (d / "evil.pt").write_bytes(pickle.dumps({"w": _Payload(d / "pwned")}))

    (d / "empty").mkdir()
    for split in ("train", "val"):
        (d / "no_classes" / split).mkdir(parents=True)
        (d / "no_images" / split / "cat").mkdir(parents=True)
    (d / "a_file").write_text("not a directory\n")
    (d / "finished").mkdir()
    (d / "finished" / "report.json").write_text("{}\n")
    (d / "finished" / "config.json").write_text('{"format": "svdnas-config/1"}\n')  # marks a run of svdnas

    (d / "bad_yaml.yaml").write_text("reduction: [0.5\nepochs: 1\n")
    (d / "unknown_key.yaml").write_text("reduction: 0.5\nbogus: 1\n")
    (d / "list.yaml").write_text("- reduction\n- 0.5\n")
    return {
        "dir": d, "data": f"fmnist:{tiny_fmnist}", "tiny": f"module:{d / 'models.py'}:tiny",
        "weights": d / "tiny.safetensors", "out": d / "out",
    }


def _module(files, func: str) -> str:
    return f"module:{files['dir'] / 'models.py'}:{func}"


def _run_dir(files, name: str, arch: str) -> Path:
    """A run directory whose architecture.json holds ``arch``."""
    d = files["dir"] / name
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes((files["dir"] / "tiny.safetensors").read_bytes())
    (d / "architecture.json").write_text(arch)
    return d


def _with_reduction(r: str) -> Callable[[dict], list]:
    return lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["out"], "--reduction", r]


_ARCH = '{{"format": "svdnas-run/1", "base": "zoo:resnet18", "input_shape": null, "plan": {plan}}}'
_BRANCH = '{{"first_kernel": {fk}, "groups": [1, 1], "rank": 1}}'

# (id, arguments given the fixture's files, fragments the error line must hold)
CASES: list[tuple[str, Callable[[dict], list], list[str]]] = [
    ("unknown-spec", lambda f: ["eval", "bogus", "--data", f["data"]], ["unknown model spec 'bogus'"]),
    ("unknown-zoo", lambda f: ["eval", "zoo:nope", "--data", f["data"]], ["unknown zoo model 'nope'"]),
    ("weights-missing", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "nope.safetensors", "--data", f["data"]],
     ["nope.safetensors does not exist"]),
    ("weights-corrupt-safetensors", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "junk.safetensors", "--data", f["data"]],
     ["cannot read", "junk.safetensors as safetensors"]),
    ("weights-corrupt-pt", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "junk.pt", "--data", f["data"]],
     ["junk.pt", "not a plain weights file"]),
    ("weights-truncated", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "truncated.pt", "--data", f["data"]],
     ["cannot read", "truncated.pt: not a plain weights file, or corrupt or truncated"]),
    ("weights-unknown-format", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "weights.npy", "--data", f["data"]],
     ["unknown weights format '.npy'"]),
    ("weights-pickle-payload", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "evil.pt", "--data", f["data"]],
     ["refused to load", "evil.pt", "not a plain weights file"]),
    ("weights-wrong-shape", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "wrong_shape.safetensors", "--data", f["data"]],
     ["does not fit the model: 'body.4.weight' has shape (24, 8, 1, 1), the model expects (24, 16, 1, 1)"]),
    ("weights-missing-key", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "missing_key.pt", "--data", f["data"]],
     ["does not fit the model: missing key 'head.bias'"]),
    ("weights-extra-key", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "extra_key.pth", "--data", f["data"]],
     ["does not fit the model: unexpected key 'extra'"]),
    ("weights-nan", lambda f: ["eval", f["tiny"], "--weights", f["dir"] / "nan.safetensors", "--data", f["data"]],
     ["'body.0.weight' holds NaN (1 of 1152 values)"]),
    ("weights-inf", lambda f: ["compress", f["tiny"], "--weights", f["dir"] / "inf.pt", "--data", f["data"],
                               "--reduction", "0.5", "--out", f["out"], "--device", "cpu"],
     ["'bn.running_var' holds inf (1 of 8 values)"]),
    ("data-missing", lambda f: ["eval", f["tiny"], "--data", f"fmnist:{f['dir'] / 'nowhere'}"], ["Fashion-MNIST not found"]),
    ("data-empty-fmnist", lambda f: ["eval", f["tiny"], "--data", f"fmnist:{f['dir'] / 'empty'}"], ["holds no train-images-idx3-ubyte"]),
    ("data-missing-imagefolder", lambda f: ["eval", f["tiny"], "--data", f"imagefolder:{f['dir'] / 'nowhere'}"], ["needs", "/train/CLASS/*.jpg"]),
    ("data-empty-imagefolder", lambda f: ["eval", f["tiny"], "--data", f"imagefolder:{f['dir'] / 'empty'}"], ["needs", "/train/CLASS/*.jpg"]),
    ("data-no-classes", lambda f: ["eval", f["tiny"], "--data", f"imagefolder:{f['dir'] / 'no_classes'}"], ["has no class folders"]),
    ("data-no-images", lambda f: ["eval", f["tiny"], "--data", f"imagefolder:{f['dir'] / 'no_images'}"], ["holds no images"]),
    ("data-unknown", lambda f: ["eval", f["tiny"], "--data", "cifar10"], ["unknown data spec 'cifar10'"]),
    ("input-shape-mismatch", lambda f: ["eval", _module(f, "rgb"), "--data", f["data"]],
     ["the model fails on an input of shape (1, 28, 28)", "--input-shape"]),
    *[(f"reduction-{r}", _with_reduction(r), [f"--reduction must be in (0, 1), got {float(r)}"]) for r in ("0", "1", "-0.5", "1.5", "nan")],
    ("reduction-and-beta", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["out"], "--reduction", "0.5", "--beta", "4"],
     ["give --reduction or --beta, not both"]),
    ("proxy-drop-out-of-range", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["out"], "--reduction", "0.5",
                                           "--proxy-drop", "150"], ["--proxy-drop must be in [0, 100] points of top-1, got 150.0"]),
    ("reduction-not-a-number", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["out"], "--reduction", "half"],
     ["invalid float value: 'half'"]),
    ("budget-unreachable", lambda f: ["compress", f["tiny"], "--weights", f["weights"], "--data", f["data"], "--out", f["out"],
                                      "--reduction", "0.99", "--filter", "pointwise", "--device", "cpu"],
     ["--reduction 0.99 cannot be met: even rank 1 in every target layer removes at most"]),
    ("filter-unknown", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["out"], "--reduction", "0.5",
                                  "--filter", "everything", "--device", "cpu"], ["unknown layer filter 'everything'"]),
    ("no-target-layer", lambda f: ["compress", _module(f, "unsupported"), "--data", f["data"], "--out", f["out"],
                                   "--reduction", "0.5", "--device", "cpu"],
     ["no layer of the model matches the layer filter 'all-but-first'", "depthwise, grouped, seq"]),
    ("out-finished", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["dir"] / "finished", "--reduction", "0.5",
                                "--device", "cpu"], ["already holds a finished run; pass --overwrite"]),
    ("out-is-a-file", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["dir"] / "a_file", "--reduction", "0.5",
                                 "--device", "cpu"], ["exists and is not a directory"]),
    ("module-file-missing", lambda f: ["eval", f"module:{f['dir'] / 'nowhere.py'}:make", "--data", f["data"]],
     ["module file", "nowhere.py does not exist"]),
    ("module-malformed", lambda f: ["eval", "module:nothing", "--data", f["data"]], ["module spec must be module:FILE.py:FUNC"]),
    ("module-no-function", lambda f: ["eval", _module(f, "nope"), "--data", f["data"]], ["has no callable 'nope'"]),
    ("module-syntax-error", lambda f: ["eval", f"module:{f['dir'] / 'syntax.py'}:make", "--data", f["data"]],
     ["importing", "syntax.py failed: SyntaxError"]),
    ("module-factory-raises", lambda f: ["eval", _module(f, "broken"), "--data", f["data"]],
     ["broken() failed: RuntimeError: the factory failed", "models.py, line"]),
    ("module-not-a-module", lambda f: ["eval", _module(f, "not_a_module"), "--data", f["data"]], ["returned int, not an nn.Module"]),
    ("rundir-not-json", lambda f: ["eval", _run_dir(f, "r_json", '{"format": '), "--data", f["data"]],
     ["architecture.json is not valid JSON"]),
    ("rundir-schema", lambda f: ["eval", _run_dir(f, "r_schema", '{"format": "svdnas-run/9", "base": 3, "plan": [], "x": 1}'), "--data", f["data"]],
     ["is not a valid architecture file", "'format' must be 'svdnas-run/1'", "'base' must be a model spec string",
      "'plan' must be an object", "unknown keys ['x']"]),
    ("rundir-bad-plan", lambda f: ["eval", _run_dir(f, "r_plan", _ARCH.format(plan='{"layers": 5}')), "--data", f["data"]],
     ["architecture.json holds an invalid plan"]),
    ("rundir-unknown-layer", lambda f: ["eval", _run_dir(f, "r_layer", _ARCH.format(
        plan='{"layers": [{"name": "nope", "branches": [' + _BRANCH.format(fk="[1, 1]") + "]}]}")), "--data", f["data"]],
     ["architecture.json does not fit zoo:resnet18", "the plan names layer 'nope'"]),
    ("rundir-bad-branch", lambda f: ["eval", _run_dir(f, "r_branch", _ARCH.format(
        plan='{"layers": [{"name": "layer1.0.conv1", "branches": [' + _BRANCH.format(fk="[2, 1]") + "]}]}")), "--data", f["data"]],
     ["layer layer1.0.conv1: first_kernel[0]=2 must be 1 or the kernel size 3"]),
    ("rundir-module-base", lambda f: ["eval", _run_dir(f, "r_code", _ARCH.format(plan='{"layers": []}').replace("zoo:resnet18", f["tiny"])),
                                      "--data", f["data"]], ["rebuilding it runs that code: pass --allow-code"]),
    ("config-invalid-yaml", lambda f: ["compress", f["tiny"], "--config", f["dir"] / "bad_yaml.yaml"], ["bad_yaml.yaml is not valid YAML at line"]),
    ("config-unknown-key", lambda f: ["compress", f["tiny"], "--config", f["dir"] / "unknown_key.yaml"],
     ["unknown_key.yaml: unknown option(s) for compress: bogus"]),
    ("config-not-a-mapping", lambda f: ["compress", f["tiny"], "--config", f["dir"] / "list.yaml"], ["must hold a mapping"]),
    ("config-missing", lambda f: ["compress", f["tiny"], "--config", f["dir"] / "nowhere.yaml"], ["cannot read --config", "No such file"]),
    ("device-unknown", lambda f: ["eval", f["tiny"], "--data", f["data"], "--device", "tpu"], ["--device must be cpu or cuda"]),
    ("missing-options", lambda f: ["compress", f["tiny"], "--reduction", "0.5"], ["compress needs --data, --out"]),
    ("unknown-command", lambda f: ["shrink", f["tiny"]], ["invalid choice: 'shrink'"]),
]


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(files, args, fragments):
    message = one_error(run_cli(*args(files)))
    for fragment in fragments:
        assert fragment in message, message
    assert not (files["dir"] / "pwned").exists()  # the pickle payload never ran


def test_cuda_without_gpu(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = one_error(run_cli("eval", files["tiny"], "--data", files["data"], "--device", "cuda"))
    assert message == "--device cuda asked for, but no CUDA GPU is available; use --device cpu"


def test_unreachable_budget_names_the_largest_reachable_reduction(files, tiny):
    """The number is the reduction with every target layer (here body.4 alone) at its cheapest rank 1."""
    from svdnas.cost.counting import layer_cost, model_macs
    from svdnas.lowrank.spec import LowRankSpec

    message = one_error(run_cli("compress", files["tiny"], "--weights", files["weights"], "--data", files["data"], "--out", files["out"],
                            "--reduction", "0.99", "--filter", "pointwise", "--device", "cpu"))
    hw = (14, 14)  # body.4 sees the stride-2 output of body.0
    saved = layer_cost(tiny.body[4], hw)[0] - layer_cost(tiny.body[4], hw, [LowRankSpec((1, 1), (1, 1), 1)])[0]
    largest = math.floor(saved / model_macs(tiny, (1, 28, 28)) * 1000) / 1000
    assert re.search(r"removes at most (\d\.\d{3}) of the FLOPs", message).group(1) == f"{largest:.3f}", message


def test_unreadable_weights(files):
    if os.geteuid() == 0:
        pytest.skip("root reads any file whatever its permissions")
    path = files["dir"] / "unreadable.safetensors"
    path.write_bytes((files["dir"] / "tiny.safetensors").read_bytes())
    path.chmod(0)
    try:
        message = one_error(run_cli("eval", files["tiny"], "--weights", path, "--data", files["data"]))
    finally:
        path.chmod(0o600)
    assert "cannot read" in message and "unreadable.safetensors" in message


@pytest.mark.slow
def test_unsupported_layers_are_left_alone_and_listed(files, tmp_path):
    """Depthwise and grouped convs and a Conv1d beside a compressible conv: the run succeeds and
    report.json names each layer left alone with its reason."""
    out = tmp_path / "run"
    r = run_cli("compress", _module(files, "mixed"), "--data", files["data"], "--out", out, "--reduction", "0.3",
            "--epochs", "1", "--search-images", "64", "--batch-size", "64", "--families", "0", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"depthwise", "grouped", "seq"}
    assert "depthwise conv (groups=8)" in skipped["depthwise"] and "grouped conv (groups=2)" in skipped["grouped"]
    assert "Conv1d is not covered" in skipped["seq"]
    plan = {layer["name"]: layer["branches"] for layer in json.loads((out / "plan.json").read_text())["layers"]}
    assert list(plan) == ["conv"] and plan["conv"]
    assert report["flops"]["reduction"] >= 0.29


@pytest.mark.slow
def test_write_error_names_the_file_and_keeps_earlier_files(files, tmp_path):
    """In a process of its own (the limit would hold pytest's own writes too): a file-size limit (failing a write as a full disk would) stops the run at its first large
    file, the search checkpoint; config.json and the accuracy proxy's checkpoint, written before, are
    intact and no temporary file is left behind."""
    import resource
    import signal

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "run"
    r = run_cli_process("compress", files["tiny"], "--weights", files["weights"], "--data", files["data"], "--out", out, "--reduction", "0.3",
            "--epochs", "1", "--search-images", "64", "--batch-size", "64", "--families", "0", "--device", "cpu", "--quiet",
            "--offer-slower",  # no latency table, whose cache file would be the first large write
            "--proxy-drop", "5",  # the accuracy proxy on (its checkpoint is written before the search's)
            preexec_fn=limit_file_size)
    message = one_error(r)
    assert message == f"cannot write {out / 'checkpoint-b1_search.pt'}: {os.strerror(errno.EFBIG)}", message
    assert json.loads((out / "config.json").read_text())["reduction"] == 0.3
    # the accuracy proxy's checkpoint, written before the search, is intact too; no temporary file is left
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-accuracy.json", "config.json"]
    assert json.loads((out / "checkpoint-accuracy.json").read_text())["layers"]


# The Python API raises the same message as a typed exception.
API_CASES = [
    ("unknown-spec", lambda f: ["eval", "bogus", "--data", f["data"]], lambda f: _build("bogus")),
    ("weights-wrong-shape", lambda f: ["eval", f["tiny"], "--weights", str(f["dir"] / "wrong_shape.safetensors"), "--data", f["data"]],
     lambda f: _build(f["tiny"], str(f["dir"] / "wrong_shape.safetensors"))),
    ("weights-nan", lambda f: ["eval", f["tiny"], "--weights", str(f["dir"] / "nan.safetensors"), "--data", f["data"]],
     lambda f: _build(f["tiny"], str(f["dir"] / "nan.safetensors"))),
    ("data-missing", lambda f: ["eval", f["tiny"], "--data", f"fmnist:{f['dir'] / 'nowhere'}"],
     lambda f: _load_data(f"fmnist:{f['dir'] / 'nowhere'}")),
    ("reduction-1", lambda f: ["compress", f["tiny"], "--data", f["data"], "--out", f["out"], "--reduction", "1"],
     lambda f: _compress_config(reduction=1.0)),
    ("rundir-schema", lambda f: ["eval", str(_run_dir(f, "r_api", '{"format": "svdnas-run/1", "plan": {}}')), "--data", f["data"]],
     lambda f: _load(f["dir"] / "r_api")),
    ("budget-unreachable", lambda f: ["compress", f["tiny"], "--weights", str(f["weights"]), "--data", f["data"], "--out", f["out"],
                                      "--reduction", "0.99", "--filter", "pointwise", "--device", "cpu"],
     lambda f: _compress(f, reduction=0.99, filter="pointwise")),
]


def _build(spec: str, weights: str | None = None):
    from svdnas.models.build import build_model

    return build_model(spec, weights)


def _load_data(spec: str):
    from svdnas.data.datasets import load_data

    return load_data(spec)


def _compress_config(**kw):
    from svdnas.pipeline.config import CompressConfig

    return CompressConfig(**kw)


def _load(directory: Path):
    import svdnas

    return svdnas.load(str(directory))


def _compress(files, **kw):
    from svdnas.data.datasets import load_data
    from svdnas.pipeline.compress import compress

    model, _ = _build(files["tiny"], str(files["weights"]))
    return compress(model, load_data(files["data"]), _compress_config(**kw))


@pytest.mark.parametrize(("args", "call"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_raises_the_same_message(files, args, call):
    message = one_error(run_cli(*args(files)))
    with pytest.raises(SvdnasError) as info:
        call(files)
    assert str(info.value) == message
