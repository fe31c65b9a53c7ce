"""A lookup table of measured layer latencies, cached on disk: the cost of the latency objective.

Each entry is the median latency of one layer shape (a conv's or linear's geometry, the spatial
size of its input, the batch and dtype) built either densely or as the low-rank block that
:func:`svdnas.decompose` makes for a list of :class:`LowRankSpec`. Timing depends on shapes, not on
weight values, so the modules are built from the key alone, with random weights. The table lives
in one JSON file per device and thread count (``latency-<device>-<threads>.json`` under
``$SVDNAS_CACHE``, default ``~/.cache/svdnas``); a second run with the same shapes measures nothing.

Batch: the latency a user means is that of answering one request, so batch 1 is the default (as
the paper's Pixel 4 figures); a larger batch models throughput-bound serving, whose per-layer
costs differ (small layers amortise their fixed overhead), so the batch is part of every key.

Many candidates differ only in rank. :meth:`LatencyTable.candidates` measures each family (kernel
split and grouping, after any fixed branches) at a lattice of ranks and interpolates linearly
between the two lattice points around a rank, which keeps the table to a few measurements per
family; ``anchors=0`` measures every candidate.

Engine: the layers are timed in PyTorch eager, or (``engine="onnxruntime"``) each exported to ONNX
and run by ONNX Runtime on the CPU, the runtime the budget is met in. ONNX Runtime's latency does
not follow the rank smoothly (a rank that is not a whole channel block leaves its blocked layout),
so that engine measures every candidate; its tables live in ``latency-<device>-<threads>-onnxruntime.json``.
A layer timed alone in ONNX Runtime also pays a session call and the conversions into and out of the
blocked layout at its boundaries, which the whole model does not: the table's sum over-states the
model's latency, a bias the latency objective's whole-model measurements calibrate away.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdnas.cost.timer import latency_runner, spread
from svdnas.errors import SpecError
from svdnas.fileio import atomic_write_json, cache_root
from svdnas.lowrank.decompose import empty_block
from svdnas.lowrank.geometry import conv_geometry, layer_geometry
from svdnas.lowrank.spec import LowRankSpec, family_max_rank
from svdnas.options import Config, option

log = logging.getLogger(__name__)
FORMAT = 1
_CHUNK = 32  # modules built and timed together
NOISY = 3.0  # p90 / p10 of a timing above which it counts as disturbed


@dataclass
class LatencyConfig(Config):
    """How the latency table measures.

    Attributes:
        batch: images per forward pass; 1 is the latency of a single request.
        warmup: untimed runs before timing (the first runs pick kernels and allocate).
        repeats: timed samples; the median is kept.
        anchors: measured ranks per family, spread over its rank range; 0 measures every candidate.
        threads: CPU threads while measuring (None: the process's current setting).
        cache: the JSON file of the table; None for the default path, "" for no file at all.
        min_sample_ms: a sample of a layer faster than this runs it several times and averages,
            so that timer resolution and call overhead do not dominate.
    """

    batch: int = option(1, flag="--latency-batch",
                        help="images per pass of the latency table's timings (the latency objective's, or the one timing "
                             "candidates; default 1: one request)")
    warmup: int = 3
    repeats: int = 15
    anchors: int = 8
    threads: int | None = None
    cache: str | None = option(None, flag="--latency-cache",
                               help="JSON file of measured layer latencies (default: latency-<device>-<threads>.json, "
                                    "or latency-<device>-<threads>-onnxruntime.json when timed in ONNX Runtime, in "
                                    "$SVDNAS_CACHE or ~/.cache/svdnas)")
    min_sample_ms: float = 0.5

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise SpecError(f"--latency-batch must be positive, got {self.batch}")
        if self.repeats < 1 or self.warmup < 0:
            raise SpecError("latency repeats must be positive and warm-up runs not negative")
        if self.anchors < 0 or self.anchors == 1:
            raise SpecError(f"latency anchors must be 0 (measure every candidate) or at least 2, got {self.anchors}")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"latency threads must be positive, got {self.threads}")


def device_label(device: torch.device | str) -> str:
    """``cpu``, or ``cuda-<gpu name>``: what a table's timings hold for."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    return device.type


ENGINES = ("pytorch", "onnxruntime")


def default_cache_path(device: torch.device | str, threads: int, engine: str = "pytorch") -> Path:
    """``$SVDNAS_CACHE/latency-<device>-<threads>.json`` (``~/.cache/svdnas`` without the variable);
    ``-onnxruntime`` before ``.json`` for that engine's table."""
    suffix = "" if engine == "pytorch" else f"-{engine}"
    return cache_root() / f"latency-{device_label(device)}-{threads}{suffix}.json"


def layer_key(layer: nn.Module, input_hw: tuple[int, int], batch: int) -> str:
    """What a layer's timing depends on, as one readable string."""
    dtype = str(layer.weight.dtype).removeprefix("torch.")
    if isinstance(layer, nn.Linear):
        bias = int(layer.bias is not None)
        return f"linear i{layer.in_features} o{layer.out_features} bias{bias} pos{input_hw[0]} n{batch} {dtype}"
    g = conv_geometry(layer)

    def pair(t: tuple[int, int]) -> str:
        return f"{t[0]}x{t[1]}"

    return (
        f"conv2d i{g.in_channels} o{g.out_channels} k{pair(g.kernel)} s{pair(g.stride)} p{pair(g.padding)} "
        f"d{pair(g.dilation)} {g.padding_mode} bias{int(g.bias)} hw{pair(input_hw)} n{batch} {dtype}"
    )


def spec_key(specs: Sequence[LowRankSpec]) -> str:
    """``dense`` for the original layer, else its branches joined by ``+``."""
    return "+".join(str(s) for s in specs) if specs else "dense"


def _build(layer: nn.Module, specs: Sequence[LowRankSpec], device: torch.device) -> nn.Module:
    """A module of the same structure as ``layer`` (or as ``decompose(layer, specs)``), random weights."""
    g = layer_geometry(layer)
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Linear):
        dense: nn.Module = nn.Linear(g.in_channels, g.out_channels, bias=g.bias, device=device, dtype=dtype)
    else:
        dense = nn.Conv2d(
            g.in_channels, g.out_channels, g.kernel, g.stride, g.padding, g.dilation,
            bias=g.bias, padding_mode=g.padding_mode, device=device, dtype=dtype,
        )
    if not specs:
        return dense.eval()
    block = empty_block(dense, specs)
    with torch.no_grad():  # uninitialised memory may hold denormals, which are slow on CPUs
        for p in block.parameters():
            p.normal_(0, 0.05)
    return block.eval()


def _input(layer: nn.Module, input_hw: tuple[int, int], batch: int, device: torch.device) -> torch.Tensor:
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Linear):
        shape = (batch, layer.in_features) if input_hw[0] == 1 else (batch, input_hw[0], layer.in_features)
        return torch.randn(*shape, device=device, dtype=dtype)
    return torch.randn(batch, layer.in_channels, *input_hw, device=device, dtype=dtype)  # type: ignore[arg-type]


def time_modules(
    modules: Sequence[nn.Module], x: torch.Tensor, warmup: int, repeats: int, min_sample_ms: float = 0.5,
    engine: str = "pytorch", threads: int | None = None,
) -> list[dict[str, float]]:
    """Median (and spread) of ``repeats`` timed forward passes of each module on ``x``; milliseconds.

    The modules are timed in interleaved rounds (one sample of each per round), so that a burst of
    load from other processes spreads over all of them instead of spoiling one. A module faster
    than ``min_sample_ms`` runs several times per sample, and the time per run is reported. With
    ``engine="onnxruntime"`` each module runs as its ONNX graph in an ONNX Runtime session of
    ``threads`` threads (on the CPU).
    """
    cuda = x.device.type == "cuda"
    if engine == "onnxruntime":  # sessions built as the whole-model comparisons' are
        calls = [latency_runner(m, tuple(x.shape[1:]), "onnxruntime", x.shape[0], torch.device("cpu"), threads, stop_spinning=True)
                 for m in modules]
    else:
        calls = [(lambda m=m: m(x)) for m in modules]

    def run(call, times: int) -> float:
        t0 = time.perf_counter()
        for _ in range(times):
            call()
        if cuda:
            torch.cuda.synchronize(x.device)
        return 1000 * (time.perf_counter() - t0)

    with torch.inference_mode():
        inner = []
        for call in calls:
            run(call, max(warmup, 1))
            once = min(run(call, 1) for _ in range(2))
            inner.append(max(1, min(100, math.ceil(min_sample_ms / max(once, 1e-6)))))
        samples: list[list[float]] = [[] for _ in calls]
        for _ in range(repeats):
            for call, n, times in zip(calls, inner, samples):
                times.append(run(call, n) / n)
    results = []
    for times, n in zip(samples, inner):
        results.append(spread(times) | {"repeats": repeats, "runs_per_sample": n})
    return results


class LatencyTable:
    """Measured latencies of layers and of their low-rank versions, on one device.

    Args:
        device: where the timings are taken.
        config: batch, repeats, anchors and the cache file.
        engine: ``pytorch`` (eager) or ``onnxruntime`` (each layer's ONNX graph in ONNX Runtime, on a CPU).

    Attributes:
        measured: timings taken by this table (cache misses), for reports and tests.
        noisy: of those, the ones whose slowest tenth took over ``NOISY`` times the fastest tenth
            (other processes competing for the cores; such a table is worth measuring again).
        used: keys of the entries looked up (measured or cached).
        seconds: time spent measuring.
    """

    def __init__(self, device: torch.device | str = "cpu", config: LatencyConfig | None = None, engine: str = "pytorch") -> None:
        if engine not in ENGINES:
            raise SpecError(f"a latency table's engine is one of {', '.join(ENGINES)}, got {engine!r}")
        self.device = torch.device(device)
        if engine == "onnxruntime" and self.device.type != "cpu":
            raise SpecError("the onnxruntime latency table measures on a CPU")
        self.engine = engine
        self.config = config or LatencyConfig()
        self.threads = self.config.threads or torch.get_num_threads()
        cache = self.config.cache
        self.path = None if cache == "" else Path(cache).expanduser() if cache else default_cache_path(self.device, self.threads, engine)
        self.meta = {
            "format": FORMAT, "engine": engine, "device": device_label(self.device), "threads": self.threads,
            "torch": torch.__version__,
        }
        if engine == "onnxruntime":
            from svdnas.cost.onnx import require_onnx

            self.meta["onnxruntime"] = require_onnx()[1].__version__
        self.entries: dict[str, dict[str, Any]] = self._load()
        self.measured = 0
        self.noisy = 0
        self.used: set[str] = set()
        self.seconds = 0.0
        self._dirty = False

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            log.warning("latency cache %s is unreadable (%s); measuring again", self.path, e)
            return {}
        stale = [k for k, v in self.meta.items() if data.get(k) != v]
        if stale:
            log.info("latency cache %s was measured with other %s; measuring again", self.path, ", ".join(stale))
            return {}
        return dict(data.get("entries", {}))

    def save(self) -> None:
        """Write the table, merged with entries another run may have added meanwhile."""
        if self.path is None or not self._dirty:
            return

        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = self._load()
        merged.update(self.entries)
        atomic_write_json(self.path, {**self.meta, "entries": dict(sorted(merged.items()))})
        self._dirty = False

    def _random(self):
        """The random weights and inputs of timing come from a forked generator: whether a run
        measures or finds its table cached must not change what the search draws after it."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _timed(self, modules: Sequence[nn.Module], x: torch.Tensor) -> list[dict[str, float]]:
        old = torch.get_num_threads()
        if self.device.type == "cpu" and self.threads != old:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        try:
            c = self.config
            return time_modules(modules, x, c.warmup, c.repeats, c.min_sample_ms, engine=self.engine, threads=self.threads)
        finally:
            self.seconds += time.perf_counter() - t0
            torch.set_num_threads(old)

    def _key(self, layer: nn.Module, input_hw: tuple[int, int], specs: Sequence[LowRankSpec]) -> str:
        return f"{layer_key(layer, input_hw, self.config.batch)} | {spec_key(specs)}"

    def lookup(
        self, layer: nn.Module, input_hw: tuple[int, int], variants: Sequence[Sequence[LowRankSpec]]
    ) -> list[float]:
        """Median latency (ms) of ``layer`` as each variant builds it: ``[]`` for the layer as it
        is, else the branches of ``decompose(layer, specs)``. Variants not in the table are
        measured together (interleaved) and added to it."""
        keys = [self._key(layer, input_hw, specs) for specs in variants]
        self.used.update(keys)
        missing = {k: specs for k, specs in zip(keys, variants) if k not in self.entries}
        todo = list(missing.items())
        for start in range(0, len(todo), _CHUNK):  # bounded memory: a chunk of modules at a time
            chunk = todo[start : start + _CHUNK]
            with self._random():
                x = _input(layer, input_hw, self.config.batch, self.device)
                results = self._timed([_build(layer, specs, self.device) for _, specs in chunk], x)
            for (key, _), result in zip(chunk, results):
                self.entries[key] = {k: result[k] for k in ("median_ms", "p10_ms", "p90_ms", "repeats")}
                self.noisy += result["p90_ms"] > NOISY * result["p10_ms"]
            self.measured += len(chunk)
            self._dirty = True
        return [float(self.entries[k]["median_ms"]) for k in keys]

    def layer(self, layer: nn.Module, input_hw: tuple[int, int], specs: Sequence[LowRankSpec] = ()) -> float:
        """Median latency (ms) of ``layer`` as it is (no specs) or decomposed into ``specs``."""
        return self.lookup(layer, input_hw, [list(specs)])[0]

    def candidates(
        self, layer: nn.Module, input_hw: tuple[int, int], candidates: Sequence[Sequence[LowRankSpec]]
    ) -> list[float]:
        """Latency (ms) of each candidate of ``layer``: a list of branches, ``[]`` for the layer as it is.

        Candidates that differ only in the last branch's rank share a family; with ``anchors``
        > 0 and the pytorch engine each family is measured at ranks 1, s, 2s, ..., its full rank (s = full rank /
        anchors, rounded up) next to the candidates' ranks, and the rest interpolated linearly.
        """
        if self.config.anchors == 0 or self.engine == "onnxruntime":
            return self.lookup(layer, input_hw, candidates)
        g = layer_geometry(layer)
        brackets: list[tuple[list[LowRankSpec], list[LowRankSpec], float]] = []  # low, high, weight of high
        for specs in candidates:
            if not specs:
                brackets.append(([], [], 0.0))
                continue
            *prefix, last = specs
            full = family_max_rank(last, g.out_channels, g.in_channels, g.kernel)
            step = max(1, math.ceil(full / self.config.anchors))
            lo = max(1, last.rank // step * step)
            hi = min(full, -(-last.rank // step) * step)
            w = 0.0 if hi == lo else (last.rank - lo) / (hi - lo)
            brackets.append(([*prefix, last.with_rank(lo)], [*prefix, last.with_rank(hi)], w))
        anchors = {spec_key(v): v for b in brackets for v in b[:2]}
        times = dict(zip(anchors, self.lookup(layer, input_hw, list(anchors.values()))))
        return [(1 - w) * times[spec_key(lo)] + w * times[spec_key(hi)] for lo, hi, w in brackets]

    def model(self, model: nn.Module, input_shape: Sequence[int]) -> float:
        """Median latency (ms) of a whole model on inputs of ``input_shape`` (C, H, W); not cached."""
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        # a copy in the default memory format, as the table's layers are built (the job's may be channels-last)
        copied = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
        with self._random():
            x = torch.randn(self.config.batch, *input_shape, device=self.device, dtype=dtype)
            return float(self._timed([copied], x)[0]["median_ms"])

    def summary(self) -> dict[str, Any]:
        """What the table did in this run, for the report."""
        return {
            **{k: self.meta[k] for k in ("engine", "device", "threads")}, "batch": self.config.batch,
            "repeats": self.config.repeats, "anchors": 0 if self.engine == "onnxruntime" else self.config.anchors, "entries": len(self.used), "measured": self.measured,
            "noisy": self.noisy,
            "measure_seconds": self.seconds, "cache": str(self.path) if self.path is not None else None,
        }
