"""Seconds and peak memory per stage of a job, as the report gives them."""

from __future__ import annotations

import torch


def peak_memory_mib() -> dict[str, float]:
    """The process's peak resident memory so far (and the peak CUDA allocation, where CUDA is in use), in MiB."""
    import resource
    import sys

    try:  # Linux: the peak of this program (ru_maxrss would carry a parent's peak across fork and exec)
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    out = {"rss": rss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class StageSeconds(dict):
    """Seconds per stage; recording a stage also notes the peak memory reached by its end."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_mib: dict[str, dict[str, float]] = {}
        self._high: dict[str, float] = {}

    def __setitem__(self, stage: str, value: float) -> None:
        super().__setitem__(stage, value)
        # a running maximum: the kernel's resident-size counters are batched per thread, so two
        # readings of the peak can differ by a few pages the wrong way
        for k, v in peak_memory_mib().items():
            self._high[k] = max(v, self._high.get(k, 0.0))
        self.peak_mib[stage] = dict(self._high)
