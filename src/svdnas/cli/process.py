"""Settings of the ``svdnas`` process itself, made once when the command line starts on the process's own
arguments (``svdnas ...``, ``python -m svdnas ...``); ``main([...])`` called from Python leaves its
caller's process as it is."""

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
    passes reuse the memory the process already holds. On ``zoo:resnet18`` at 60% the fit took 8.4 s
    against 9.4 s with glibc's own arenas, back to back (2026-12-05, ``benchmarks/tables/derivation_cost.py
    --fresh-processes``, ``benchmarks/results/derivation_cost/resnet18_0.6_{one_arena,arenas16}.json``).
    Torch is imported by then: arenas that its threads already made stay, and are shared.
    """
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False
