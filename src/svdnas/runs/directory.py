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
from svdnas.surgery.swap import apply_plan

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
    fit_state_dict(model, read_state_dict(weights), str(weights))
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
