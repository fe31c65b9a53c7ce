import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_net

FACTORY = '''
import torch
from torch import nn
import sys
sys.path.insert(0, {root!r})
from tests.conftest import TinyNet

def make():
    return TinyNet()
'''


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svdnas", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def module_spec(tmp_path) -> tuple[str, Path]:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY.format(root=str(Path(__file__).parents[1])))
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net().state_dict().items()}, weights)
    return f"module:{path}:make", weights


def test_eval_json_on_module_model(module_spec, tiny_fmnist):
    spec, weights = module_spec
    r = run("eval", spec, "--weights", str(weights), "--data", f"fmnist:{tiny_fmnist}", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result) == {"top1", "top5", "flops", "params"}
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert result["params"] == sum(p.numel() for p in tiny_net().parameters())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "zoo:nope", "--data", "fmnist"], "unknown zoo model"),
        (["eval", "bogus", "--data", "fmnist"], "unknown model spec"),
        (["eval", "zoo:resnet18", "--weights", "/nonexistent.safetensors", "--data", "fmnist"], "does not exist"),
        (["eval", "zoo:resnet18", "--data", "fmnist:/nonexistent"], "Fashion-MNIST not found"),
        (["eval", "zoo:resnet18", "--data", "fmnist", "--device", "cuda"], "no CUDA GPU"),
        (["baseline", "pca", "zoo:resnet18"], "invalid choice: 'pca'"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--beta", "4"], "not both"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "1.5"], "(0, 1)"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--proxy-images", "0"], "--proxy-images must be positive"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--objective", "latency", "--latency-batch", "0"], "--latency-batch must be positive"),
        (["compress", "zoo:resnet18", "--data", "none", "--out", "/tmp/x", "--reduction", "0.5", "--mode", "few-shot"], "works only with --mode data-free"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--mode", "synthetic", "--synth-iterations", "0"], "must be positive"),
        (["synth", "zoo:resnet18", "--num", "8", "--out", "/tmp/x.png"], ".safetensors"),
    ],
)
def test_bad_input_gives_one_error_line(args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_space_command_counts(module_spec):
    spec, _ = module_spec
    r = run("space", spec, "--input-shape", "1,28,28", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["name"] for row in out["layers"]] == ["body.0", "body.4"]
    assert "body.3" in out["skipped"]


def test_config_file_flags_override_and_resolved_config_is_saved(module_spec, tiny_fmnist, tmp_path):
    spec, weights = module_spec
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: fmnist:{tiny_fmnist}\nreduction: 0.4\nepochs: 1\nsearch-images: 100\nfilter: convs\nout: {tmp_path / 'run'}\n")
    r = run("compress", spec, "--weights", str(weights), "--config", str(cfg), "--epochs", "2", "--proxy-images", "48", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["reduction"] == 0.4 and saved["search_images"] == 100
    assert json.loads((tmp_path / "run" / "report.json").read_text())["data"]["proxy_images"] == 48
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["epoch"]) == 2
    cfg.write_text("bogus: 1\n")
    r = run("compress", spec, "--config", str(cfg))
    assert r.returncode == 2 and "unknown option(s) for compress: bogus" in r.stderr
    r = run("compress", spec, "--reduction", "0.5")
    assert r.returncode == 2 and "needs --data, --out" in r.stderr
