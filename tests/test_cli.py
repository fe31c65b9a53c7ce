import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svdnas.cli import COMMANDS, build_parser
from tests.conftest import run_cli, run_cli_process, tiny_net

FACTORY = '''
import sys
sys.path.insert(0, {root!r})
from tests.conftest import TinyNet

def make():
    return TinyNet()
'''


@pytest.fixture
def module_spec(tmp_path) -> tuple[str, Path]:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY.format(root=str(Path(__file__).parents[1])))
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net().state_dict().items()}, weights)
    return f"module:{path}:make", weights


def test_eval_json_on_module_model(module_spec, tiny_fmnist):
    spec, weights = module_spec
    r = run_cli("eval", spec, "--weights", weights, "--data", f"fmnist:{tiny_fmnist}", "--json", "--device", "cpu")
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
        (["baseline", "pca", "zoo:resnet18"], "invalid choice: 'pca'"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--beta", "4"], "not both"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x"], "give --reduction R"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "1.5"], "(0, 1)"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--proxy-images", "0"], "--proxy-images must be positive"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--objective", "latency", "--latency-batch", "0"],
         "--latency-batch must be positive"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--mode", "synthetic", "--synth-iterations", "0"],
         "(--synth-iterations) must be positive"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--epochs", "0"], "--epochs must be positive"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--grid", "0.3"], "--grid must be START:STOP"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--grid", "0.6:0.3"], "--grid must satisfy"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--mode", "few-shot", "--shots", "0"],
         "--shots must be positive"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--resume", "--overwrite"], "not both"),
        (["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--search-dtype", "int8"], "invalid choice: 'int8'"),
        (["synth", "zoo:resnet18", "--num", "8", "--out", "/tmp/x.png"], ".safetensors"),
        (["synth", "zoo:resnet18", "--num", "0", "--out", "/tmp/x.safetensors"], "(--num) must be positive"),
        (["baseline", "uniform", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/x", "--reduction", "0.5", "--split", "best",
          "--search-images", "0"], "--search-images must be positive, got 0"),
        (["eval", "zoo:resnet18", "--data", "none"], "eval needs real data: --data none works only with compress --mode data-free"),
        (["latency", "zoo:resnet18", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
        (["latency", "zoo:resnet18", "--threads", "-1"], "--threads: must be at least 1, got -1"),
        (["latency", "zoo:resnet18", "--batch", "two"], "--batch: 'two' is not a whole number"),
        (["latency", "zoo:resnet18", "--device", "bogus"], "--device must be cpu or cuda"),
        (["latency", "zoo:resnet18", "--input-shape", "3,32,32"], "the model fails on an input of shape (3, 32, 32)"),
        (["export", "zoo:resnet18", "--onnx", "/tmp/svdnas-never-written.onnx", "--opset", "99"], "writes opsets 7 to 20; got 99"),
        (["export", "zoo:resnet18", "--onnx", "/tmp/svdnas-never-written.onnx", "--input-shape", "3,32,32"],
         "the model fails on an input of shape (3, 32, 32)"),
    ],
)
def test_bad_input_gives_one_error_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_a_baseline_with_bad_options_leaves_no_run_directory(tmp_path):
    out = tmp_path / "run"
    r = run_cli("baseline", "uniform", "zoo:resnet18", "--data", "fmnist", "--reduction", "1.5", "--out", out)
    assert r.returncode == 2 and "--reduction must be in (0, 1)" in r.stderr and not out.exists()


def test_latency_times_on_the_device_asked_for(monkeypatch):
    from svdnas.cost import timer

    asked = []
    monkeypatch.setattr(timer, "torch_latency", lambda model, shape, device="cpu", **kw: asked.append(device) or {
        "median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0, "min_ms": 1.0, "repeats": kw["repeats"]})
    r = run_cli("latency", "zoo:resnet18", "--device", "cpu", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert asked == [torch.device("cpu")] and json.loads(r.stdout.strip().splitlines()[-1])["device"] == "cpu"


def test_every_command_has_help():
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert len(sub) == len(COMMANDS)
    for name in sub:
        r = run_cli(name, "--help")
        assert r.returncode == 0 and f"usage: svdnas {name}" in r.stdout, r.stderr


def test_help_shows_the_dataclass_defaults():
    from svdnas.pipeline.config import CompressConfig

    text = " ".join(run_cli("compress", "--help").stdout.split())
    assert f"(default: {CompressConfig.__dataclass_fields__['proxy_images'].default})" in text
    assert "--synth-images SYNTH_IMAGES synthetic images to make (default: 1384)" in text  # compress's own default for synth.num
    assert "--epochs EPOCHS passes of the search over the search images (at most: see --patience) (default: 5)" in text


def test_space_command_counts(module_spec):
    spec, _ = module_spec
    r = run_cli("space", spec, "--input-shape", "1,28,28", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["name"] for row in out["layers"]] == ["body.0", "body.4"]
    assert "body.3" in out["skipped"]


def test_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run_cli("eval", "zoo:resnet18", "--data", "fmnist", "--device", "cuda")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


@pytest.mark.slow
def test_entry_point_in_its_own_process(module_spec):
    spec, _ = module_spec
    r = run_cli_process("space", spec, "--input-shape", "1,28,28", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["total"] > 0
    bad = run_cli_process("compress", spec, "--reduction", "0.5", "--beta", "1", "--data", "fmnist", "--out", "/tmp/x")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: give --reduction or --beta, not both (exactly one of them)"


def test_the_command_line_sets_its_process_up_before_anything_else_but_not_a_python_callers(monkeypatch):
    import svdnas.cli

    calls = []
    monkeypatch.setattr(svdnas.cli, "one_malloc_arena", lambda: calls.append("arena") or True)
    monkeypatch.setattr(svdnas.cli, "build_parser", lambda: calls.append("parser") or build_parser())
    monkeypatch.setattr("sys.argv", ["svdnas", "--version"])
    with pytest.raises(SystemExit):  # argparse's --version
        svdnas.cli.main()  # the process's own arguments, as the console script runs it
    assert calls == ["arena", "parser"]
    calls.clear()
    assert run_cli("--version").returncode == 0  # main(["--version"]): a Python caller's list
    assert calls == ["parser"]


ARENAS = '''
import ctypes, sys, threading
from svdnas.cli.process import one_malloc_arena
print(one_malloc_arena())
barrier, held = threading.Barrier(4), []

def allocate():  # four threads holding memory at once
    barrier.wait()
    held.append([bytearray(100_000) for _ in range(20)])
    barrier.wait()

threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena n:" line per arena, on stderr
'''


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
@pytest.mark.parametrize("variable, made, one", [(None, "True", True), ("8", "False", False)])
def test_one_malloc_arena_serves_every_thread_unless_the_variable_says_otherwise(variable, made, one):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    if variable:
        env["MALLOC_ARENA_MAX"] = variable
    done = subprocess.run([sys.executable, "-c", ARENAS], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == made
    arenas = sum(line.startswith("Arena") for line in done.stderr.splitlines())
    assert arenas == 1 if one else arenas > 1
