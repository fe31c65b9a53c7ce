"""--out and its neighbours, driven through the command line as a user would: a run directory of svdnas
is never mixed into a user's folder, --resume and --overwrite do only what they say."""

import json
import shutil
from pathlib import Path

import pytest

from svdnas.errors import BudgetError
from svdnas.runs.directory import CONFIG_FORMAT, REPLACED, check_out_dir, is_run_dir, is_run_file
from tests.conftest import run_cli

USER_FILE = "notes.txt"
USER_BYTES = b"the user's own notes\n\x00\xff"


def one_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0][len("error: "):]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def user_folder(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / USER_FILE).write_bytes(USER_BYTES)
    return d


@pytest.fixture(scope="module")
def inputs(tiny_fmnist, tmp_path_factory):
    from safetensors.torch import save_file

    from tests.conftest import tiny_net

    d = tmp_path_factory.mktemp("run_dirs")
    (d / "f.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
                            "from tests.conftest import TinyNet\n\ndef make():\n    return TinyNet()\n")
    save_file({k: v.contiguous() for k, v in tiny_net().state_dict().items()}, d / "w.safetensors")
    return {"dir": d, "model": f"module:{d / 'f.py'}:make", "weights": d / "w.safetensors", "data": f"fmnist:{tiny_fmnist}"}


def compress_args(inputs, out: Path, *more) -> list:
    return ["compress", inputs["model"], "--weights", inputs["weights"], "--data", inputs["data"], "--out", out,
            "--reduction", "0.4", "--epochs", "1", "--search-images", "64", "--proxy-images", "32", "--families", "0",
            "--proxy-drop", "0", "--filter", "convs", "--device", "cpu", "--quiet", *more]


@pytest.fixture(scope="module")
def finished(inputs) -> Path:
    """A finished compress run with a user's file in it."""
    out = inputs["dir"] / "finished"
    r = run_cli(*compress_args(inputs, out))
    assert r.returncode == 0, r.stderr
    (out / USER_FILE).write_bytes(USER_BYTES)
    return out


@pytest.mark.parametrize("command", ["compress", "baseline", "finetune"])
def test_a_users_folder_is_refused_and_left_as_it_was(inputs, finished, tmp_path, command):
    folder = user_folder(tmp_path / "mine")
    (folder / "report.json").write_text("{}\n")  # a name a run uses, but not a run of svdnas
    before = snapshot(folder)
    args = {
        "compress": compress_args(inputs, folder),
        "baseline": ["baseline", "uniform", inputs["model"], "--weights", inputs["weights"], "--data", inputs["data"],
                     "--reduction", "0.4", "--out", folder, "--device", "cpu"],
        "finetune": ["finetune", finished, "--data", inputs["data"], "--mode", "few-shot", "--out", folder, "--allow-code", "--device", "cpu"],
    }[command]
    for extra in ([], ["--overwrite"]):
        message = one_error(run_cli(*args, *extra))
        assert "is not empty and is not a run directory of svdnas" in message and USER_FILE in message and "report.json" in message
        assert snapshot(folder) == before


def test_report_and_export_refuse_to_write_over_a_users_files(inputs, finished, tmp_path):
    folder = user_folder(tmp_path / "mine")
    (folder / "report.json").write_text("{}\n")
    before = snapshot(folder)
    assert "is not a run directory of svdnas" in one_error(run_cli("report", folder))
    assert snapshot(folder) == before
    onnx = folder / "model.onnx"
    onnx.write_bytes(USER_BYTES)
    assert "already exists; pass --overwrite" in one_error(run_cli("export", finished, "--onnx", onnx, "--allow-code"))
    assert onnx.read_bytes() == USER_BYTES


def test_synth_refuses_files_that_are_not_its_own(inputs, tmp_path):
    folder = user_folder(tmp_path / "mine")
    base = ["synth", inputs["model"], "--weights", inputs["weights"], "--input-shape", "1,28,28", "--num", "8",
            "--synth-iterations", "2", "--synth-batch-size", "8", "--device", "cpu"]
    (folder / "images.json").write_text('{"mine": true}\n')
    (folder / "other.safetensors").write_bytes(USER_BYTES)
    (folder / "work.partial").mkdir()
    (folder / "work.partial" / "x").write_bytes(USER_BYTES)
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):
        assert "is not the metadata of svdnas synthetic images" in one_error(run_cli(*base, "--out", folder / "images.safetensors", *extra))
        assert "is not svdnas synthetic images" in one_error(run_cli(*base, "--out", folder / "other.safetensors", *extra))
        assert "not the work folder of an svdnas generation" in one_error(run_cli(*base, "--out", folder / "work.safetensors", *extra))
    assert snapshot(folder) == before
    # its own images: refused without --overwrite, replaced with it; the user's files stay as they were
    r = run_cli(*base, "--out", folder / "made.safetensors")
    assert r.returncode == 0, r.stderr
    assert "--overwrite" in one_error(run_cli(*base, "--out", folder / "made.safetensors"))
    r = run_cli(*base, "--out", folder / "made.safetensors", "--overwrite", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((folder / "made.json").read_text())["seed"] == 1
    assert {k: v for k, v in snapshot(folder).items() if not k.startswith("made")} == before


def test_resume_needs_a_matching_run(inputs, finished, tmp_path):
    assert "holds no run to resume" in one_error(run_cli(*compress_args(inputs, tmp_path / "missing", "--resume")))
    assert not (tmp_path / "missing").exists()
    assert "already holds a finished run: nothing to resume" in one_error(run_cli(*compress_args(inputs, finished, "--resume")))
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(finished / "config.json", started / "config.json")
    assert "holds no checkpoint of a run to resume" in one_error(run_cli(*compress_args(inputs, started, "--resume")))
    (started / "checkpoint-accuracy.json").write_text("{}\n")
    before = snapshot(started)
    message = one_error(run_cli(*compress_args(inputs, started, "--resume", "--epochs", "3")))
    assert "was made with --epochs 1, not 3" in message, message
    message = one_error(run_cli(*compress_args(inputs, started, "--resume", "--synth-lr", "0.25")))
    assert "was made with --synth-lr 0.5, not 0.25" in message, message
    assert snapshot(started) == before
    # a run of an earlier version, whose config.json does not know an option of this one
    config = json.loads((started / "config.json").read_text())
    del config["calibration_patches"]
    (started / "config.json").write_text(json.dumps(config))
    message = one_error(run_cli(*compress_args(inputs, started, "--resume")))
    assert "made by a version of svdnas without --calibration-patches" in message, message
    assert "unfinished run; pass --resume" in one_error(run_cli(*compress_args(inputs, started)))


def test_overwrite_replaces_only_the_runs_files(inputs, finished, tmp_path, monkeypatch):
    import svdnas.pipeline.compress as pipeline

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old = snapshot(out)
    assert "already holds a finished run; pass --overwrite" in one_error(run_cli(*compress_args(inputs, out)))
    assert snapshot(out) == old

    # a run that fails puts the old one back
    def fails(*a, **kw):
        (out / "checkpoint-accuracy.json").write_text("{}\n")
        raise BudgetError("--reduction 0.5 cannot be met")

    monkeypatch.setattr(pipeline, "compress", fails)
    assert "cannot be met" in one_error(run_cli(*compress_args(inputs, out, "--overwrite", "--reduction", "0.5")))
    assert snapshot(out) == old

    # a killed run leaves both: the old one aside, the new one's checkpoints to resume
    def killed(*a, **kw):
        (out / "checkpoint-accuracy.json").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compress", killed)
    assert run_cli(*compress_args(inputs, out, "--overwrite", "--reduction", "0.5")).returncode == 130
    aside = {k.removeprefix(f"{REPLACED}/"): v for k, v in snapshot(out).items() if k.startswith(REPLACED)}
    assert aside == {k: v for k, v in old.items() if k != USER_FILE}
    assert json.loads((out / "config.json").read_text())["reduction"] == 0.5 and is_run_dir(out)
    monkeypatch.undo()

    (out / "checkpoint-accuracy.json").unlink()  # a stand-in, not a real checkpoint: start the new run again
    r = run_cli(*compress_args(inputs, out, "--overwrite", "--reduction", "0.5"))
    assert r.returncode == 0, r.stderr
    assert not (out / REPLACED).exists()
    assert json.loads((out / "report.json").read_text())["reduction_target"] == 0.5
    assert (out / USER_FILE).read_bytes() == USER_BYTES


def test_how_a_run_directory_is_recognised(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"format": CONFIG_FORMAT}))
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "architecture.json").write_text('{"format": "svdnas-run/1"}')
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text('{"lr": 0.1}')
    assert is_run_dir(tmp_path / "cfg") and is_run_dir(tmp_path / "arch") and not is_run_dir(tmp_path / "theirs")
    assert is_run_file("checkpoint-b2_search.pt") and is_run_file(".report.json.k3j2") and is_run_file("synthetic.partial")
    assert not is_run_file(USER_FILE) and not is_run_file(".bashrc")
    check_out_dir(tmp_path / "cfg")  # nothing but a config: a run that stopped before any result
    with pytest.raises(ValueError, match="it holds config.json"):
        check_out_dir(tmp_path / "theirs", overwrite=True)


def test_the_config_json_a_run_wrote_reproduces_its_configs(inputs, finished):
    from svdnas.cli.compress import make_config
    from svdnas.pipeline.config import CompressConfig
    from svdnas.runs.directory import load_config
    from tests.test_cli_config import parsed

    saved = load_config(finished, CompressConfig)
    assert saved.search.epochs == 1 and saved.proxy_images == 32 and saved.filter == "convs"
    again = parsed("compress", inputs["model"], "--config", str(finished / "config.json"))
    assert make_config(again) == saved and again.weights == str(inputs["weights"]) and again.data == inputs["data"]
