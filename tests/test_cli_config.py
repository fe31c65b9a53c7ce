"""The config dataclasses are the command line's one source: options made from their fields, --config
files and a run's config.json read back into the same configs."""

import json

import pytest

from svdnas.cli import build_parser
from svdnas.cli.common import apply_config
from svdnas.cli.compress import make_config
from svdnas.cost.table import LatencyConfig
from svdnas.errors import SpecError
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.synthetic import SynthConfig
from svdnas.runs.directory import config_record, load_config, read_config, save_config
from svdnas.search.loop import SearchConfig
from tests.conftest import run_cli


def parsed(*argv: str):
    """The namespace the command line makes of ``argv``, --config applied."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.config:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        args = apply_config(parser, sub, list(argv), args)
    return args


COMPRESS = ["compress", "zoo:resnet18", "--data", "fmnist", "--out", "/tmp/never"]


@pytest.mark.parametrize("config", [
    SearchConfig(epochs=3, lr=0.05, betas=(0.8, 0.9), target=0.4, sampling="two"),
    FinetuneConfig(mode="full", augment=True, collapse=0.0),
    SynthConfig(num=64, channel_mean=False, parallel=2),
    LatencyConfig(batch=4, cache=""),
    CompressConfig(beta=4.0, grid=(0.2, 0.6, 0.1), max_groups=4, mode="few-shot", finetune=FinetuneConfig(shots=10),
                   latency=LatencyConfig(batch=2), objective="latency", search=SearchConfig(epochs=2, target=0.5)),
], ids=lambda c: type(c).__name__)
def test_configs_round_trip_through_json(config):
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_refuses_what_it_does_not_know():
    with pytest.raises(SpecError, match="unknown SearchConfig setting.*: bogus"):
        SearchConfig.from_dict({"target": 0.5, "bogus": 1})
    with pytest.raises(SpecError, match="--epochs must be an integer, got 'x'|--epochs: invalid int value"):
        SearchConfig.from_dict({"target": 0.5, "epochs": "x"})


def test_the_options_are_the_dataclass_defaults():
    config = make_config(parsed(*COMPRESS, "--reduction", "0.5"))
    assert config == CompressConfig(reduction=0.5)


def test_flags_reach_the_nested_configs():
    config = make_config(parsed(*COMPRESS, "--reduction", "0.5", "--epochs", "3", "--mode", "data-free", "--synth-images", "200",
                                "--no-channel-mean", "--finetune-lr", "0.02", "--objective", "latency", "--latency-batch", "4",
                                "--grid", "0.2:0.6", "--max-groups", "0"))
    assert config.search.epochs == 3 and config.synth.num == 200 and config.synth.channel_mean is False
    assert config.finetune.mode == "synthetic" and config.finetune.lr == 0.02 and config.latency.batch == 4
    assert config.grid == (0.2, 0.6, 0.05) and config.max_groups is None


def test_a_config_file_of_option_names_and_flags_over_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reduction: 0.3\nepochs: 5\nsearch-images: 100\nsynth-images: 300\ngrid: [0.2, 0.5]\n"
                   "search: {temperature: 3.0}\nbeta: null\n")
    config = make_config(parsed(*COMPRESS, "--config", str(cfg), "--epochs", "2"))
    assert config.reduction == 0.3 and config.search.epochs == 2 and config.search_images == 100
    assert config.synth.num == 300 and config.grid == (0.2, 0.5, 0.05) and config.search.temperature == 3.0
    cfg.write_text("reduction: 0.3\nepochs: [1]\n")
    r = run_cli(*COMPRESS, "--config", cfg)
    assert r.returncode == 2 and r.stderr.strip() == "error: --epochs must be an integer, got [1]"
    cfg.write_text("reduction: 0.3\nsearch: {bogus: 1}\n")
    r = run_cli(*COMPRESS, "--config", cfg)
    assert r.returncode == 2 and "unknown SearchConfig setting(s): bogus" in r.stderr
    cfg.write_text(json.dumps({"format": "svdnas-config/1", "command": "baseline", "reduction": 0.3}))
    r = run_cli(*COMPRESS, "--config", cfg)
    assert r.returncode == 2 and "holds the options of svdnas baseline" in r.stderr


def test_a_runs_config_json_passed_back_reproduces_its_configs(tmp_path):
    args = parsed(*COMPRESS, "--reduction", "0.45", "--epochs", "3", "--mode", "few-shot", "--shots", "20", "--grid", "0.3:0.7:0.1",
                  "--objective", "latency", "--latency-cache", "", "--synthetic", "s.safetensors", "--filter", "convs", "--seed", "3")
    config = make_config(args)
    save_config(tmp_path, config, command="compress", model="zoo:resnet18", data="fmnist", seed=3, out="/tmp/never")
    assert load_config(tmp_path, CompressConfig) == config
    again = parsed("compress", "zoo:resnet18", "--config", str(tmp_path / "config.json"))
    assert make_config(again) == config
    assert again.seed == 3 and again.data == "fmnist" and again.out == "/tmp/never"


def test_save_config_keeps_what_the_command_line_recorded(tmp_path):
    config = CompressConfig(reduction=0.5)
    (tmp_path / "config.json").write_text(json.dumps(config_record(config, data="fmnist", seed=1)))
    save_config(tmp_path, CompressConfig(reduction=0.6))
    saved = read_config(tmp_path)
    assert saved["reduction"] == 0.6 and saved["data"] == "fmnist" and saved["seed"] == 1


def test_contract_flags_exist():
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.items()}
    common = {"--device", "--seed", "--quiet", "--config"}
    assert common <= set.intersection(*flags.values())
    assert {"--data", "--reduction", "--out", "--mode", "--objective", "--branches", "--beta", "--shots", "--search-images",
            "--weights", "--overwrite", "--resume"} <= flags["compress"]
    assert {"--data", "--reduction", "--out", "--weights"} <= flags["baseline"]
    assert {"--data", "--json"} <= flags["eval"] and {"--num", "--out"} <= flags["synth"]
    assert {"--data", "--mode", "--out"} <= flags["finetune"] and {"--onnx"} <= flags["export"]
    assert {"--onnx", "--threads", "--batch"} <= flags["latency"]
