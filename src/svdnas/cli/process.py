"""Settings of the ``svdnas`` process itself, made once when the command line starts (a Python
caller's process is left as it is)."""

from __future__ import annotations

import ctypes
import os
import platform

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def one_malloc_arena() -> bool:
    """Have every thread of this process allocate from glibc's main arena, as ``MALLOC_ARENA_MAX=1``
    would; nothing where the variable is set already or the C library is not glibc. Returns whether
    the setting was made.

    The prefix fit runs each calibration batch's forward pass on a thread of its own. With an arena
    per thread, each pass first faults in memory that nothing has touched yet; with one arena the
    passes reuse the memory the process already holds. On ``zoo:resnet18`` at 60% this took the fit
    from 10.1 s to 8.5 s and a whole ``compress`` with ``--derivation weight`` from 32.5 s to 31.2 s
    (2026-12-05, ``benchmarks/tables/derivation_cost.py --fresh-processes``).
    """
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False
