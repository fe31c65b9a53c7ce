"""Reading weights safely: safetensors, or torch.load(weights_only=True); nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from svdnas.errors import WeightsError


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
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler refuses anything but tensors and plain containers
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(f"refused to load {path}: not a plain weights file ({first})") from e
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path} does not hold a state dict of tensors")
        return obj
    raise WeightsError(f"unknown weights format {path.suffix!r} for {path}: use .safetensors, .pt or .pth")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` strictly; a mismatch names the first offending key."""
    fit_state_dict(model, read_state_dict(path), str(path))
    return model


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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
    model.load_state_dict(state, strict=True)
