"""Run directories: model.safetensors + architecture.json + plan.json (+ report.json); atomic writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from svdnas.errors import SpecError, WeightsError, WriteError
from svdnas.fileio import atomic_write_bytes, atomic_write_json
from svdnas.lowrank.plan import Plan
from svdnas.models.build import ModelInfo, build_model
from svdnas.models.weights import fit_state_dict, read_state_dict
from svdnas.surgery.swap import add_saved_biases, apply_plan

FORMAT = "svdnas-run/1"
PYTHON_BASE = "python:model"  # the base of a run made from a Python object: svdnas.load needs base_model=


@dataclass(frozen=True)
class RunDir:
    """Where a run is written, and how its uncompressed base can be rebuilt when it is loaded.

    Attributes:
        path: the run directory.
        base: the MODEL spec recorded in architecture.json (``zoo:resnet18``, ``module:f.py:make``, ...);
            the default says the model was a Python object, so loading it needs ``base_model=``.
    """

    path: Path
    base: str = PYTHON_BASE

    @classmethod
    def of(cls, out: str | Path | RunDir) -> RunDir:
        """``out`` as a RunDir (a plain path records a Python-object base)."""
        return out if isinstance(out, RunDir) else cls(Path(out))


def save_model_file(path: str | Path, model: nn.Module) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


def save_run(out: str | Path, model: nn.Module, plan: Plan, base_spec: str, input_shape: tuple[int, ...] | None) -> Path:
    """Write the compressed model, its architecture and its plan into the run directory ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(out, e) from e
    save_model_file(out / "model.safetensors", model)
    arch = {"format": FORMAT, "base": base_spec, "input_shape": list(input_shape) if input_shape else None, "plan": plan.to_dict()}
    atomic_write_json(out / "architecture.json", arch)
    atomic_write_json(out / "plan.json", plan.to_dict())
    return out


def _validate_architecture(arch: Any, path: Path) -> None:
    """Check architecture.json's shape before anything is built from it."""
    problems = []
    if not isinstance(arch, dict):
        problems.append("top level must be an object")
    else:
        if arch.get("format") != FORMAT:
            problems.append(f"'format' must be {FORMAT!r}")
        if not isinstance(arch.get("base"), str) or not arch.get("base"):
            problems.append("'base' must be a model spec string")
        shape = arch.get("input_shape")
        if shape is not None and (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(x, int) and x > 0 for x in shape)):
            problems.append("'input_shape' must be null or three positive ints")
        if not isinstance(arch.get("plan"), dict):
            problems.append("'plan' must be an object")
        extra = set(arch) - {"format", "base", "input_shape", "plan"}
        if extra:
            problems.append(f"unknown keys {sorted(extra)}")
    if problems:
        raise SpecError(f"{path} is not a valid architecture file: {'; '.join(problems)}")


def load_run(directory: str | Path, base_model: nn.Module | None = None, allow_code: bool = False):
    """Rebuild a compressed model from a run directory, with no unpickling.

    Args:
        directory: a directory written by compress, baseline or finetune.
        base_model: the uncompressed architecture, for runs whose base is not a spec svdnas can
            rebuild (a model passed to the Python API); its weights are replaced.
        allow_code: rebuild a ``module:`` base (runs the user code the run was made from).

    Returns:
        (model, ModelInfo) with the model in eval mode.
    """

    d = Path(directory)
    arch_path, weights = d / "architecture.json", d / "model.safetensors"
    for p in (arch_path, weights):
        if not p.is_file():
            raise WeightsError(f"{d} is not a run directory: {p.name} is missing")
    try:
        arch = json.loads(arch_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{arch_path} is not valid JSON: {e}") from e
    _validate_architecture(arch, arch_path)
    try:
        plan = Plan.from_dict(arch["plan"])
    except SpecError as e:
        raise SpecError(f"{arch_path} holds an invalid plan: {e}") from e
    if base_model is not None:
        model, info = base_model, ModelInfo(arch["base"], None)
    else:
        if arch["base"].startswith("python:"):
            raise SpecError(f"{d} was made from a Python object; pass base_model= to rebuild it")
        if arch["base"].startswith("module:") and not allow_code:
            raise SpecError(
                f"{d} was made from {arch['base']}; rebuilding it runs that code: pass --allow-code "
                "(allow_code=True) to trust it"
            )
        model, base_info = build_model(arch["base"], pretrained=False)
        info = ModelInfo(arch["base"], base_info.input_shape, base_info.default_filter)
    try:
        apply_plan(model, plan, derive=False)
    except SpecError as e:
        raise SpecError(f"{arch_path} does not fit {arch['base']}: {e}") from e
    state = read_state_dict(weights)
    add_saved_biases(model, state)
    fit_state_dict(model, state, str(weights))
    info.spec = str(d)
    if arch["input_shape"]:
        info.input_shape = tuple(arch["input_shape"])  # type: ignore[assignment]
    model.eval()
    return model, info


def write_run(out: str | Path, model: nn.Module, plan: Plan, model_spec: str, shape: tuple[int, ...], report: dict, **extra: Any) -> None:
    """model.safetensors, architecture.json, plan.json, report.json and any ``extra`` JSON files."""
    save_run(out, model, plan, model_spec, shape)
    for name, obj in extra.items():
        atomic_write_json(Path(out) / f"{name}.json", obj)
    atomic_write_json(Path(out) / "report.json", report)


def load_model(
    spec: str, weights: str | None = None, pretrained: bool = True, allow_code: bool = False
) -> tuple[nn.Module, ModelInfo]:
    """The model a MODEL argument names: a run directory (see :func:`load_run`), or any spec :func:`build_model` takes.

    Raises:
        SpecError: unknown or malformed spec, or ``weights`` given with a run directory.
        WeightsError: weights missing, unsafe or not fitting.
    """
    if ":" not in spec and Path(spec).is_dir():
        if weights:
            raise SpecError("--weights does not apply to a run directory: it holds its own weights")
        return load_run(spec, allow_code=allow_code)
    return build_model(spec, weights, pretrained=pretrained, allow_code=allow_code)


# --- what a run directory is, and how --out claims one ----------------------------------------------
#
# A run directory is recognised by its marker: config.json with "format": CONFIG_FORMAT, which every
# run writes before anything else (the command line, and compress through save_config), or, for a
# run written without one, architecture.json with "format": FORMAT. Its files are the names in
# RUN_FILES and RUN_PATTERNS; anything else in it is the user's and is never moved or removed.

CONFIG_FORMAT = "svdnas-config/1"
RUN_FILES = frozenset({
    "config.json", "model.safetensors", "architecture.json", "plan.json", "report.json", "history.json",
    "report.md", "layers.png", "history.png", "synthetic.safetensors", "synthetic.json",
})
RUN_PATTERNS = ("checkpoint-*.pt", "checkpoint-*.json", "*.partial", "synthetic-*-of-*.safetensors")
REPLACED = "replaced.partial"  # where --overwrite keeps the run it replaces until the new one is whole


def config_record(config: Any, /, **extra: Any) -> dict[str, Any]:
    """What config.json holds: the format marker, ``extra`` (what is not part of the config: the
    command line's model, data, device, seed...) and ``config.to_dict()``."""
    return {"format": CONFIG_FORMAT, **extra, **config.to_dict()}


def save_config(out: str | Path | RunDir, config: Any, /, **extra: Any) -> Path:
    """Write ``config.json`` into the run directory (see :func:`config_record`).

    Keys of an existing config.json of a run that are neither the config's nor in ``extra`` are
    kept, so a function that records its config after the command line recorded its own options
    keeps those. Written first, the file marks the directory as a run of svdnas.
    """
    d = RunDir.of(out).path
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(d, e) from e
    path = d / "config.json"
    old = read_config(d) if _marker(path, CONFIG_FORMAT) else {}
    atomic_write_json(path, {"format": CONFIG_FORMAT, **old, **config_record(config, **extra)})
    return path


def read_config(out: str | Path | RunDir) -> dict[str, Any]:
    """The mapping ``config.json`` holds (format marker removed); a SpecError if it is missing or not ours."""
    path = RunDir.of(out).path / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path.parent} holds no config.json") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read {path}: {e}") from e
    if not isinstance(values, dict) or values.get("format") != CONFIG_FORMAT:
        raise SpecError(f"{path} is not the config of an svdnas run (no \"format\": {CONFIG_FORMAT!r})")
    return {k: v for k, v in values.items() if k != "format"}


def load_config(out: str | Path | RunDir, cls: type) -> Any:
    """The ``cls`` config (e.g. CompressConfig) that :func:`save_config` wrote; other keys are ignored."""
    import dataclasses

    values = read_config(out)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls.from_dict({k: v for k, v in values.items() if k in names})


def _marker(path: Path, fmt: str) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory of svdnas (see the marker above)."""
    d = Path(path)
    return d.is_dir() and (_marker(d / "config.json", CONFIG_FORMAT) or _marker(d / "architecture.json", FORMAT))


def is_run_file(name: str) -> bool:
    """Whether an entry of a run directory named ``name`` is one a run writes."""
    from fnmatch import fnmatch

    if name.startswith("."):  # an atomic write's temporary file: .NAME.RANDOM
        stem = name[1:].rsplit(".", 1)[0]
        return bool(stem) and "." in name[1:] and is_run_file(stem)
    return name in RUN_FILES or any(fnmatch(name, p) for p in RUN_PATTERNS)


def run_files(path: str | Path) -> list[Path]:
    """The entries of the run directory ``path`` that belong to its run (none if it is not one)."""
    d = Path(path)
    if not is_run_dir(d):
        return []
    return sorted(p for p in d.iterdir() if is_run_file(p.name))


def _listing(paths: list[Path], most: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in sorted(paths)]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_out_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse an output directory a run must not write into; nothing is written.

    Accepted: a missing or empty directory; a run directory of svdnas holding nothing but its
    config (a run that stopped before any result); with ``resume``, a run directory with
    checkpoints; with ``overwrite``, any run directory. Refused, with a SpecError that says why and
    what to do: a file; a non-empty directory that is not a run directory (its entries named); a
    finished run without ``overwrite``; an unfinished one without either flag; ``resume`` with
    nothing to resume.
    """
    d = Path(path)
    if resume and overwrite:
        raise SpecError("give --resume or --overwrite, not both")
    if d.exists() and not d.is_dir():
        raise SpecError(f"{flag} {d} exists and is not a directory")
    entries = list(d.iterdir()) if d.is_dir() else []
    if not entries:
        if resume:
            raise SpecError(f"--resume: {d} holds no run to resume; leave out --resume to start one")
        return
    if not is_run_dir(d):
        raise SpecError(f"{flag} {d} is not empty and is not a run directory of svdnas (it holds {_listing(entries)}); "
                        "give a new or empty directory")
    if overwrite:
        return
    ours = [p for p in entries if is_run_file(p.name)]
    if (d / "report.json").is_file():
        raise SpecError(f"{d} already holds a finished run{': nothing to resume' if resume else ''}; pass --overwrite to replace it")
    checkpoints = [p for p in ours if p.name not in ("config.json", REPLACED)]
    if resume and not checkpoints:
        raise SpecError(f"--resume: {d} holds no checkpoint of a run to resume; leave out --resume to start again")
    if checkpoints and not resume:
        raise SpecError(f"{d} holds the checkpoints of an unfinished run; pass --resume to continue it or --overwrite to start again")


MISSING = object()  # config_difference's value for a setting one of the configs does not record


def config_difference(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> tuple[str, Any, Any] | None:
    """The first setting (a dotted key, ``search.epochs``) whose value differs between two configs,
    with both values (:data:`MISSING` where a config does not record it: an older version's run)."""
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = config_difference(a, b, frozenset(k.split(".", 1)[1] for k in ignore if k.startswith(key + ".")))
            if inner is not None:
                return (f"{key}.{inner[0]}", inner[1], inner[2])
        elif a != b:
            return (key, a, b)
    return None


@dataclass
class Replacement:
    """How ``--overwrite`` replaces a run: the old run's files are moved into ``replaced.partial/``
    inside the run directory when the new run starts (its config.json is copied there and then
    replaced atomically, so the directory always carries a marker), and removed only once the new
    run is whole (:meth:`finish`). A killed run leaves both: the new one's checkpoints (``--resume``
    continues it) and the old run in ``replaced.partial/``; a run that fails with an error puts
    the old run back (:meth:`restore`). The user's files in the directory are never touched.

    Attributes:
        path: the run directory.
        moved: the old run's files now in ``replaced.partial/`` (empty when nothing was replaced).
    """

    path: Path
    moved: list[str]

    def finish(self) -> None:
        """The new run is whole: remove the replaced one."""
        import shutil

        shutil.rmtree(self.path / REPLACED, ignore_errors=True)

    def restore(self) -> None:
        """The new run failed: remove what it wrote and put the replaced run back."""
        import shutil

        if not self.moved:
            return
        aside = self.path / REPLACED
        for p in run_files(self.path):
            if p.name != REPLACED:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name in self.moved:
            if (aside / name).exists():
                (aside / name).replace(self.path / name)
        shutil.rmtree(aside, ignore_errors=True)


def start_run_dir(path: str | Path, config: dict[str, Any], *, overwrite: bool = False) -> Replacement:
    """Claim a run directory that :func:`check_out_dir` accepted: set any run it holds aside (with
    ``overwrite``) and write ``config`` (already holding the format marker) as its config.json."""
    import shutil

    d = Path(path)
    moved: list[str] = []
    try:
        d.mkdir(parents=True, exist_ok=True)
        ours = [p for p in run_files(d) if p.name != REPLACED]
        if overwrite and ours:
            aside = d / REPLACED
            finished = (d / "report.json").is_file()
            if aside.is_dir() and not finished:
                # an earlier replacement never finished: the run kept aside is the last whole one; what is
                # here is only the unfinished run that was to replace it
                for p in ours:
                    if p.name != "config.json":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                moved = sorted(q.name for q in aside.iterdir())
            else:
                shutil.rmtree(aside, ignore_errors=True)
                aside.mkdir()
                for p in ours:
                    if p.name == "config.json":
                        shutil.copy2(p, aside / p.name)
                    else:
                        p.replace(aside / p.name)
                    moved.append(p.name)
        atomic_write_json(d / "config.json", config)
    except OSError as e:
        raise WriteError(d, e) from e
    return Replacement(d, moved)
