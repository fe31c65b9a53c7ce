"""What every command shares: the parser's error line, the common options, MODEL and DATA, --config, --out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from svdnas.cli.options import Section, dest_of
from svdnas.errors import SpecError, SvdnasError

T = TypeVar("T")

# settings whose change does not change a run's results: --resume may differ in them
RESUME_IGNORES = frozenset({"out", "device", "allow_code", "synth.parallel"})


class Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (anything else is a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def device_of(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SvdnasError(f"--device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SvdnasError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def add_common(p: argparse.ArgumentParser, sections: list[Section] | None = None) -> None:
    """--config, --device, --seed, --quiet; ``sections`` are the configs the command builds (for --config)."""
    p.add_argument("--config", default=None, help="YAML (or JSON) file of this command's options, or a run's config.json; flags override it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(sections=sections or [])


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo:NAME, torchvision:NAME, module:FILE.py:FUNC or a run directory")
    p.add_argument("--weights", default=None, help=".safetensors, .pt or .pth (loaded without unpickling)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input when the model does not say")
    p.add_argument("--allow-code", action="store_true", help="let a run directory rebuild a module: base (runs its code)")


def add_out_args(p: argparse.ArgumentParser, what: str = "run directory to write", resume: bool = True) -> None:
    p.add_argument("--out", default=None, help=f"{what}: missing, empty, or a run directory of svdnas")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its files only; the old run is removed once the new one is whole)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue a killed run from the checkpoints in --out")


def need(args: argparse.Namespace, *names: str) -> None:
    """Options that a command needs, from the command line or --config."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is None]
    if missing:
        raise SvdnasError(f"{args.command} needs {', '.join(missing)} (on the command line or in --config)")


def progress_bar(args: argparse.Namespace, total: int, desc: str, unit: str = "img"):
    from tqdm import tqdm

    disable = args.quiet or not sys.stdout.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


def stage_bar(args: argparse.Namespace, first_stage: str):
    """A progress bar that every stage of a run updates: (bar, ``progress(stage, done, total)``); close the bar at the end."""
    from svdnas import distributed as ddp

    bar = progress_bar(args, 0, first_stage, unit="step")
    if not ddp.is_main():
        bar.disable = True

    def progress(stage: str, done: int, total: int) -> None:
        bar.set_description(stage)
        bar.total, bar.n = total, done
        bar.refresh()

    return bar, progress


def run_claimed(args: argparse.Namespace, record: Callable[[], dict[str, Any]], first_stage: str, work: Callable[[Any], T]):
    """``work(progress)`` into the run directory ``args.out``, claimed first by rank 0 with ``record()``
    (config.json's contents), under a stage progress bar; on failure the directory's earlier run is put
    back. Synchronises and shuts the process group down afterwards.

    Returns:
        (what ``work`` returned, the claim: call its ``finish()`` once the run is whole) on rank 0,
        None on the other ranks.
    """
    from svdnas import distributed as ddp

    replacement = claim_out(args, record()) if ddp.is_main() else None
    ddp.barrier()
    bar, progress = stage_bar(args, first_stage)
    try:
        result = work(progress)
    except Exception:
        if replacement is not None:
            replacement.restore()
        raise
    finally:
        bar.close()
    main = ddp.is_main()
    ddp.barrier()
    ddp.shutdown()
    return (result, replacement) if main else None


def input_shape(args: argparse.Namespace, info, data) -> tuple[int, int, int]:
    if args.input_shape:
        try:
            shape = tuple(int(x) for x in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise SvdnasError(f"--input-shape must be C,H,W, got {args.input_shape!r}")
        return shape  # type: ignore[return-value]
    if info.input_shape:
        return info.input_shape
    if data is not None:
        return data.input_shape
    raise SvdnasError(f"cannot tell the input shape of {info.spec}; give --input-shape C,H,W")


def model_and_data(args: argparse.Namespace, device: torch.device, data_free: bool = False):
    """The MODEL and the labelled DATA of a command, checked against each other (DATA may be none only when ``data_free``)."""
    from svdnas.data.datasets import load_data
    from svdnas.runs.directory import load_model
    from svdnas.surgery.trace import check_input

    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    data = load_data(args.data)
    if data is None and not data_free:
        where = "--mode data-free" if args.command == "compress" else "compress --mode data-free"
        raise SvdnasError(f"{args.command} needs real data: --data none works only with {where}")
    shape = input_shape(args, info, data)
    if data is not None and tuple(shape) != tuple(data.input_shape):
        raise SvdnasError(f"{args.model} expects inputs {tuple(shape)}, but {args.data} has {data.input_shape}")
    model = model.to(device)
    check_input(model, shape)
    return model, info, data, shape


# --- --config -------------------------------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping a YAML or JSON --config file holds, its keys with ``-`` read as ``_``."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SvdnasError(f"cannot read --config {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        import yaml
    except ImportError:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SvdnasError(f"--config {path} is not valid JSON (install PyYAML for YAML): {e}") from e
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise SvdnasError(f"--config {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SvdnasError(f"--config {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv, args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse with the --config file's values as defaults, so that flags given still win.

    Keys are option names (``search-images``), or, as a run's config.json holds them, the command's
    config fields: the main config's by name (``synthetic_path``) and a nested config as a mapping
    of its fields (``search: {epochs: 3, temperature: 4.0}``), which may also set what has no flag.
    A null value leaves an option at its default. Nested mappings are applied first, flat names over them.
    """
    from svdnas.runs.directory import CONFIG_FORMAT

    values = read_config_file(args.config)
    fmt = values.pop("format", CONFIG_FORMAT)
    if fmt != CONFIG_FORMAT:
        raise SpecError(f"--config {args.config} has format {fmt!r}; this svdnas reads {CONFIG_FORMAT!r}")
    made_by = values.pop("command", args.command)
    if made_by != args.command:
        raise SpecError(f"--config {args.config} holds the options of svdnas {made_by}, not of svdnas {args.command}")
    sections: list[Section] = args.sections
    nested = {s.key: values.pop(s.key) for s in sections if s.key and s.key in values}
    for key, v in nested.items():
        if v is not None and not isinstance(v, dict):
            raise SpecError(f"--config {args.config}: {key} must be a mapping of its settings, got {v!r}")
    renamed = {f.name: dest_of(s.flag(f)) for s in sections if s.key is None for f in s.fields()}
    values = {renamed.get(k, k): v for k, v in values.items()}
    known = {a.dest for a in sub._actions}
    unknown = sorted(set(values) - known - {"config", "sections"})
    if unknown:
        raise SvdnasError(f"--config {args.config}: unknown option(s) for {args.command}: {', '.join(unknown)}")
    positional = {a.dest for a in sub._actions if not a.option_strings}
    sub.set_defaults(**{k: v for k, v in values.items() if k not in positional and v is not None})
    args = parser.parse_args(argv)
    args.nested = {k: v for k, v in nested.items() if v is not None}
    return args


def nested_of(args: argparse.Namespace, key: str) -> dict[str, Any] | None:
    """What a --config file gave for the nested config ``key``."""
    return getattr(args, "nested", {}).get(key)


# --- --out ----------------------------------------------------------------------------------------


def check_out(args: argparse.Namespace) -> None:
    """Refuse --out before anything is loaded or written (see :func:`svdnas.runs.directory.check_out_dir`)."""
    from svdnas.runs.directory import check_out_dir

    check_out_dir(args.out, resume=getattr(args, "resume", False), overwrite=args.overwrite)


def flag_for_key(sections: list[Section], key: str) -> str:
    """The option that sets the config.json key ``key`` (``search.epochs`` -> ``--epochs``)."""
    head, _, tail = key.partition(".")
    for s in sections:
        name = tail if s.key == head and tail else key if s.key is None and not tail else None
        for f in s.fields() if name else []:
            if f.name == name:
                return s.flag(f)
    return "MODEL" if key == "model" else key if tail else f"--{key.replace('_', '-')}"


def claim_out(args: argparse.Namespace, record: dict[str, Any]):
    """Make --out this run's directory and write ``record`` as its config.json; under --resume, first
    check that the run there was made with the same options. Returns the Replacement (see
    :class:`svdnas.runs.directory.Replacement`): call ``finish()`` once the run is whole."""
    from svdnas.runs.directory import MISSING, config_difference, read_config, start_run_dir

    if getattr(args, "resume", False):
        old = read_config(args.out)
        new = {k: v for k, v in record.items() if k != "format"}
        diff = config_difference(old, new, RESUME_IGNORES)
        if diff is not None:
            key, was, now = diff
            flag = flag_for_key(args.sections, key)
            if was is MISSING or now is MISSING:
                raise SpecError(f"--resume: the run in {args.out} was made by a version of svdnas "
                                f"{'without' if was is MISSING else 'with'} {flag}; resume it with that version, or --overwrite to start again")
            raise SpecError(f"--resume: the run in {args.out} was made with {flag} {_shown(was)}, "
                            f"not {_shown(now)}; give the same options to resume it, or --overwrite to start again")
    return start_run_dir(args.out, record, overwrite=args.overwrite)


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def cli_record(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The command-line-only options a run's config.json records beside its config."""
    return {"command": args.command, **{n: getattr(args, n) for n in names}}


# --- what the commands print ----------------------------------------------------------------------


def print_outcome(r: dict) -> None:
    """Accuracy (before and after recovery) and fidelity lines of a report."""
    rec = r.get("recovery")
    if r.get("top1"):
        if rec and "before" in rec:
            print(f"top-1 after compression {rec['before']['top1']:.2f}%, after {rec['mode']} recovery {r['top1']['compressed']:.2f}%")
        print(f"top-1 {r['top1']['original']:.2f}% -> {r['top1']['compressed']:.2f}% (drop {r['top1']['drop_pp']:.2f}pp)")
    if r.get("fidelity"):
        f = r["fidelity"]
        print(f"top-1 agreement with the original on {f['images']} held-out synthetic images: {f['top1_agreement']:.2f}%")


def print_latency(r: dict) -> None:
    """The report's measured latency in one line, saying plainly when the compressed model is slower."""
    lat = r.get("latency")
    if not lat:
        return
    line = (f"latency ({lat['runtime']}, batch {lat['batch']}, {lat['threads']} threads): {lat['original_ms']:.3f} ms -> "
            f"{lat['compressed_ms']:.3f} ms ({-100 * lat['reduction']:+.2f}%)")
    if "predicted" in lat:
        line += f"; predicted {-100 * lat['predicted']['reduction']:+.2f}%"
    print(line)
    if lat["slower"]:
        print(f"note: the compressed model is slower than the original in {lat['runtime']} here")
    budget = lat.get("measured_budget")
    if budget is not None and not budget["met"]:
        best = budget["attempts"][budget["kept"]]["reduction"]
        print(f"note: the latency budget was not met on the whole model measured in {budget['runtime']}: the fastest plan "
              f"of the candidates measured -{100 * best:.2f}% (see report.json latency.measured_budget)")


def write_report_quietly(out: str) -> None:
    from svdnas.report.plots import write_report

    write_report(out)
