"""Pieces the benchmark scripts share (imported as a sibling module: the scripts run from benchmarks/)."""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import sys
from datetime import date

from torch.utils.data import Subset

from svdnas.data.datasets import DataBundle


def first_test_images(data: DataBundle, n: int | None) -> DataBundle:
    """``data`` evaluated on its first ``n`` test images only (all of them when ``n`` is None)."""
    if n is None:
        return data
    return dataclasses.replace(data, test=Subset(data.test, range(min(n, len(data.test)))))


def machine(threads: int) -> str:
    """What a result was measured on, as the JSON files record it."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {threads} threads"


def stamp(threads: int) -> dict[str, str]:
    """When, where and how a result was measured: the date, :func:`machine` and the command line."""
    return {"date": date.today().isoformat(), "machine": machine(threads), "command": shlex.join(["python", *sys.argv])}
