"""MODEL specs of the contract: zoo:, torchvision:, module:, and run directories."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from svdnas.errors import SpecError, WeightsError, describe
from svdnas.models.weights import load_weights
from svdnas.zoo.registry import INPUT_SHAPES, WEIGHTS_DIR, create_model, weights_path

log = logging.getLogger(__name__)

# The layers the paper compresses in each architecture.
_ZOO_FILTERS = {"resnet18": "all-but-first", "mobilenetv2": "pointwise", "efficientnet_b0": "pointwise"}


@dataclass
class ModelInfo:
    """Where a model came from and what it expects.

    Attributes:
        spec: the MODEL spec it was built from (a run directory's base spec for directories).
        input_shape: (C, H, W) of one input, when known.
        default_filter: the layer-filter preset the paper used for this architecture.
        weights: the weights file it was loaded from, if any.
    """

    spec: str
    input_shape: tuple[int, int, int] | None
    default_filter: str = "all-but-first"
    weights: str | None = None


def _zoo(name: str, pretrained: bool) -> tuple[nn.Module, ModelInfo]:
    model = create_model(name)
    path = weights_path(name)
    if pretrained and path is None and not name.endswith("_imagenet"):
        raise WeightsError(f"zoo:{name} has no shipped weights in this installation ({WEIGHTS_DIR})")
    if pretrained and path is not None:
        load_weights(model, path)
    base = name.removesuffix("_imagenet")
    info = ModelInfo(f"zoo:{name}", INPUT_SHAPES[name], _ZOO_FILTERS.get(base, "all-but-first"), str(path) if path and pretrained else None)
    return model, info


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision  # noqa: F401
        from torchvision import models
    except Exception as e:  # ImportError, or a binary mismatch with this torch
        raise SpecError(f"torchvision:{name} needs an importable torchvision ({type(e).__name__}: {e})") from e
    try:
        return models.get_model(name, weights=None)
    except (ValueError, KeyError) as e:
        raise SpecError(f"torchvision has no model {name!r}") from e


def _describe_user_error(e: BaseException) -> str:
    """An exception from user code as one line: its type, message and where in the user's file."""
    text = describe(e)
    if isinstance(e, SyntaxError):  # its message already says where
        return text
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__ and not f.filename.startswith("<")]
    return f"{text} ({frames[-1].filename}, line {frames[-1].lineno})" if frames else text


def _module(target: str) -> nn.Module:
    where, sep, func = target.rpartition(":")
    if not sep or not where or not func:
        raise SpecError(f"module spec must be module:FILE.py:FUNC or module:pkg.mod:FUNC, got module:{target}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"module file {where} does not exist")
        mod_name = f"svdnas_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise SpecError(f"cannot import {where}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:  # the user's code: a syntax error, a failing import, ...
            del sys.modules[mod_name]
            raise SpecError(f"importing {where} failed: {_describe_user_error(e)}") from e
    else:
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            raise SpecError(f"cannot import module {where!r}: {e}") from e
        except Exception as e:
            raise SpecError(f"importing {where} failed: {_describe_user_error(e)}") from e
    factory = getattr(mod, func, None)
    if not callable(factory):
        raise SpecError(f"{where} has no callable {func!r}")
    try:
        model = factory()
    except Exception as e:
        raise SpecError(f"{where}:{func}() failed: {_describe_user_error(e)}") from e
    if not isinstance(model, nn.Module):
        raise SpecError(f"{where}:{func}() returned {type(model).__name__}, not an nn.Module")
    return model


def build_model(
    spec: str, weights: str | None = None, pretrained: bool = True, allow_code: bool = False
) -> tuple[nn.Module, ModelInfo]:
    """Build the model a MODEL spec names.

    Args:
        spec: ``zoo:NAME``, ``torchvision:NAME``, ``module:FILE.py:FUNC``, ``module:pkg.mod:FUNC``
            (a run directory is read by :func:`svdnas.runs.load_model`).
        weights: a ``.safetensors``/``.pt``/``.pth`` file to load.
        pretrained: load the zoo's shipped weights.
        allow_code: whether a run directory whose base is a ``module:`` spec may run that code
            (a ``module:`` spec given here directly always runs: the user named it).

    Raises:
        SpecError: unknown or malformed spec.
        WeightsError: weights missing, unsafe or not fitting.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind == "zoo":
        model, info = _zoo(rest, pretrained)
    elif sep and kind == "torchvision":
        model, info = _torchvision(rest), ModelInfo(spec, None)
    elif sep and kind == "module":
        model, info = _module(rest), ModelInfo(spec, None)
    else:
        raise SpecError(
            f"unknown model spec {spec!r}: use zoo:NAME, torchvision:NAME, module:FILE.py:FUNC or a run directory"
        )
    if weights:
        load_weights(model, weights)
        info.weights = weights
    elif kind == "torchvision" and pretrained:  # a run directory rebuilds its base without weights, then loads its own
        log.warning("%s without --weights has torchvision's random initial weights (nothing is downloaded)", spec)
    model.eval()
    return model, info
