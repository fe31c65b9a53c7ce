"""Files written whole or not at all: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from svdnas.errors import WriteError


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    Raises:
        WriteError: an ``OSError`` naming the file, when the disk is full or the folder not
            writable; an earlier version of ``path`` is left intact and no temporary file remains.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _new_file_mode())  # mkstemp makes 0600; the file should read as any other the user writes
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, e) from e


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """A checkpoint of tensors and plain values, written atomically (read it with ``torch.load(..., weights_only=True)``)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def cache_root() -> Path:
    """svdnas's cache folder (latency tables, evaluations): ``$SVDNAS_CACHE``, else ``~/.cache/svdnas``."""
    return Path(os.environ.get("SVDNAS_CACHE") or Path.home() / ".cache" / "svdnas")
