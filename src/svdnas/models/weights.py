"""Reading weights safely: safetensors, or torch.load(weights_only=True); nothing is unpickled."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from svdnas.errors import WeightsError, describe


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or ``.pt``/``.pth`` loaded with ``weights_only=True``.

    A checkpoint that wraps the state dict under ``state_dict`` or ``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says it all
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # the unpickler refuses anything but tensors and plain containers
            raise WeightsError(f"refused to load {path}: not a plain weights file ({_unpickler_reason(e)})") from e
        except Exception as e:  # truncated zip, not a pickle at all, ...
            raise WeightsError(f"cannot read {path}: not a plain weights file, or corrupt or truncated ({describe(e)})") from e
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path} does not hold a state dict of tensors")
        return obj
    raise WeightsError(f"unknown weights format {path.suffix!r} for {path}: use .safetensors, .pt or .pth")


def _unpickler_reason(e: BaseException) -> str:
    """The line of torch's weights-only refusal that says what it met, without its advice to unpickle."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "unsupported content")
    return lines[0] if lines else type(e).__name__


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the first tensor that does.

    Raises:
        WeightsError: naming ``source`` and the parameter or buffer.
    """
    for key, value in state.items():
        if not (value.is_floating_point() or value.is_complex()):
            continue
        bad = ~torch.isfinite(value)
        if bad.any():
            n_nan = int(torch.isnan(value).sum())
            what = "NaN" if n_nan == int(bad.sum()) else ("inf" if n_nan == 0 else "NaN and inf")
            raise WeightsError(
                f"{source}: {key!r} holds {what} ({int(bad.sum())} of {value.numel()} values); "
                "the weights are corrupt or their training diverged"
            )


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` strictly; a mismatch names the first offending key."""
    fit_state_dict(model, read_state_dict(path), str(path))
    return model


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, after checking every key, shape and value.

    Raises:
        WeightsError: naming the first missing, unexpected or misshapen key, or the first
            tensor holding NaN or inf.
    """
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise WeightsError(f"{source} does not fit the model: missing key {key!r}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise WeightsError(
                f"{source} does not fit the model: {key!r} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise WeightsError(f"{source} does not fit the model: unexpected key {extra[0]!r}")
    check_finite(state, source)
    model.load_state_dict(state, strict=True)
