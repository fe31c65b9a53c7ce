"""The one-layer accuracy proxy: a candidate is kept only if compressing its layer alone, the
rest of the network untouched, costs at most ``threshold`` points of top-1 on the proxy images.

Three things keep it fast.

* **Prefix replay.** Every module that finishes before the target layer starts computes the same
  output whatever the candidate, so one forward pass per batch records those outputs and the
  candidates' passes replay them: only the target layer and what runs after it is recomputed.
  This works on any ``nn.Module`` (no tracing): modules are ordered by hooks, and a module is
  replayed only if it runs once per forward pass and returns tensors. Whether the replay is
  faithful is checked per layer on a few images (the original layer through the replay must give
  the original logits); when it is not, every pass runs in full.
  The recorded outputs are kept (:class:`PrefixRecording`) while they fit in ``cache_mib``: for
  every target layer of the model at once when they all fit, so the full network runs once per
  batch for the whole proxy, else per layer, else recorded again on every call.
* **Early rejection.** Images are evaluated a batch at a time; a candidate that has already lost
  more images than the threshold allows, whatever the rest give, is not evaluated further.
* **Search by rank.** Within a family (split and grouping) the candidates are truncations of one
  SVD, so a larger rank approximates the layer better; the proxy assumes the accuracy drop falls
  with the rank and finds each family's smallest acceptable rank by bisection, evaluating about
  log2(n) of its n ranks instead of all of them (``exhaustive=True`` evaluates them all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from svdnas.data.evaluate import batches
from svdnas.hooks import evaluation_mode
from svdnas.lowrank.derivation import Derivation
from svdnas.search.candidates import LayerCandidates

log = logging.getLogger(__name__)

BATCH = 64  # images per pass of the proxy: small enough to stop a failing candidate early


def _tensors_only(out) -> bool:
    if isinstance(out, Tensor):
        return True
    return isinstance(out, tuple) and len(out) > 0 and all(isinstance(t, Tensor) for t in out)


def _clone(out):
    return out.clone() if isinstance(out, Tensor) else tuple(t.clone() for t in out)


def _nbytes(out) -> int:
    return sum(t.numel() * t.element_size() for t in ((out,) if isinstance(out, Tensor) else out))


@dataclass
class _Run:
    """How a module ran in one forward pass: the clock at each call's start, at its (last) end,
    whether it returned tensors only, and the bytes of its output per image."""

    starts: list[int]
    end: int
    tensors: bool
    bytes_per_image: float


@torch.no_grad()
def _module_runs(model: nn.Module, x: Tensor) -> dict[str, _Run]:
    runs: dict[str, _Run] = {}
    clock = [0]
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def pre(m, a, name=name):
            runs.setdefault(name, _Run([], -1, False, 0.0)).starts.append(clock[0])
            clock[0] += 1

        def post(m, a, out, name=name):
            r = runs[name]
            r.end, r.tensors = clock[0], _tensors_only(out)
            if r.tensors:
                r.bytes_per_image = _nbytes(out) / len(x)
            clock[0] += 1

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return runs


def _replayable(runs: dict[str, _Run], target: str) -> list[str]:
    if target not in runs:
        raise ValueError(f"{target} is not called in the model's forward pass")
    start = runs[target].starts[0]
    ok = {n for n, r in runs.items() if len(r.starts) == 1 and r.end < start and r.tensors}
    return [n for n in ok if n.rpartition(".")[0] not in ok]


def replayable_modules(model: nn.Module, target: str, x: Tensor) -> list[str]:
    """The outermost modules that finish before ``target`` starts, run once per forward pass and
    return tensors: their outputs do not depend on what ``target`` computes."""
    return _replayable(_module_runs(model, x), target)


@contextmanager
def _swapped(module: nn.Module, forward: Callable) -> Iterator[None]:
    """``module`` computes ``forward`` instead of its own forward (hooks still run)."""
    # an instance attribute shadows the class's method; set through __dict__ because nn.Module's
    # __setattr__ would register a module as a child named "forward" instead
    if forward is module:  # the layer itself: nothing to swap (and no recursion)
        yield
        return
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        del module.__dict__["forward"]


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    with evaluation_mode(model), torch.no_grad():
        yield


class PrefixRecording:
    """The proxy images in batches, and the outputs of the model's modules on them.

    One forward pass per batch records, for every layer of ``targets`` at once, the outputs of the
    modules its candidates can replay (see :func:`replayable_modules`), and the original's logits;
    the recording is kept while it fits in ``cache_mib``, so that a model's whole accuracy proxy
    runs the full network once per batch instead of once per layer and batch. Layers it does not
    cover (not in ``targets``, or too much to keep) get their own recording through
    :meth:`for_layer`. The model must not change while a recording is in use.
    """

    def __init__(
        self, model: nn.Module, data: Dataset | None, device, targets: Sequence[str] = (), batch_size: int | None = None,
        cache_mib: float = 1024.0, *, _batches: list[tuple[Tensor, Tensor]] | None = None, _runs: dict[str, _Run] | None = None,
    ) -> None:
        self.model, self.device, self.cache_mib = model, device, cache_mib
        if _batches is None:
            assert data is not None
            _batches = [(x.to(device), y.to(device)) for x, y in batches(data, batch_size or BATCH)]
        self.batches = _batches
        if not self.batches:
            raise ValueError("the accuracy proxy needs at least one image")
        self.images = sum(len(y) for _, y in self.batches)
        if _runs is None:
            with _evaluating(model):
                _runs = _module_runs(model, self.batches[0][0][:2])
        self.runs = _runs
        needed: set[str] = set()
        for t in targets:
            needed.update(_replayable(self.runs, t))
        size = sum(self.runs[n].bytes_per_image for n in needed) * self.images
        self.kept = needed if size <= cache_mib * 2**20 else set()
        self._outputs: list[dict[str, object]] = []
        self._logits: list[Tensor] = []
        self._top1: float | None = None

    def replayable(self, target: str) -> list[str]:
        return _replayable(self.runs, target)

    def for_layer(self, target: str) -> PrefixRecording:
        """This recording if it holds what ``target`` replays, otherwise one of its own."""
        if set(self.replayable(target)) <= self.kept:
            return self
        own = PrefixRecording(self.model, None, self.device, [target], cache_mib=self.cache_mib, _batches=self.batches, _runs=self.runs)
        own._top1 = self.original_top1()  # one pass of the model for all layers (none is kept here)
        return own

    def record(self, x: Tensor, names: Sequence[str]) -> tuple[dict[str, object], Tensor]:
        """A full pass over ``x`` that keeps a copy of the outputs of the modules ``names``."""
        saved: dict[str, object] = {}
        handles = [
            self.model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: saved.__setitem__(n, _clone(out)))
            for n in names
        ]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return saved, logits

    def _fill(self, k: int) -> None:
        while len(self._outputs) <= k:
            saved, logits = self.record(self.batches[len(self._outputs)][0], sorted(self.kept))
            self._outputs.append(saved)
            self._logits.append(logits)

    def saved(self, k: int, names: Sequence[str]) -> dict[str, object]:
        """The outputs of the modules ``names`` on batch ``k`` (call in eval mode, without grad)."""
        if set(names) <= self.kept:
            self._fill(k)
            return {n: self._outputs[k][n] for n in names}
        return self.record(self.batches[k][0], names)[0]

    def original_top1(self) -> float:
        """The unmodified model's top-1 (%) on the images (the recording pass gives it when kept)."""
        if self._top1 is None:
            with _evaluating(self.model):
                if self.kept:
                    self._fill(len(self.batches) - 1)
                    logits = self._logits
                else:
                    logits = [self.model(x) for x, _ in self.batches]
            correct = sum(int((z.argmax(1) == y).sum()) for z, (_, y) in zip(logits, self.batches))
            self._top1 = 100.0 * correct / self.images
        return self._top1


class OneLayerEvaluator:
    """Top-1 of ``model`` on ``data`` with the layer ``name`` replaced, reusing the prefix.

    Args:
        model: the original model (left as it was after every call).
        name: dotted name of the layer to replace.
        data: labelled proxy images (not needed with a ``recording``).
        device: where to run.
        batch_size: images per pass.
        original_top1: the unmodified model's top-1 on ``data``, if known (it is the same for
            every layer).
        cache_mib: most memory the replayed outputs of all batches may take to be kept between
            calls (0: record them again on every call).
        recording: the images and the modules' outputs shared by the layers of one model.
    """

    check_images = 8  # images the replay is checked on

    def __init__(
        self, model: nn.Module, name: str, data: Dataset | None, device, batch_size: int = 256, original_top1: float | None = None,
        cache_mib: float = 1024.0, recording: PrefixRecording | None = None,
    ) -> None:
        self.model, self.name, self.device = model, name, device
        self.layer = model.get_submodule(name)
        if recording is None:
            recording = PrefixRecording(model, data, device, [name], batch_size, cache_mib)
        self.recording = recording.for_layer(name)
        self.batches, self.images = self.recording.batches, self.recording.images
        self.original_top1 = original_top1 if original_top1 is not None else self.recording.original_top1()
        self.replay = self.recording.replayable(name)
        if self.replay and not self._faithful():
            log.warning("%s: replaying the layers before it does not reproduce the model's output; running in full", name)
            self.replay = []

    def _faithful(self) -> bool:
        """Whether the original layer through the replay gives the model's own logits (checked on
        a few images: the replay is the same computation whatever the batch)."""
        x = self.batches[0][0][: self.check_images]
        with _evaluating(self.model):
            saved, reference = self.recording.record(x, self.replay)
            replayed = self._tail(x, saved, self.layer)
        return torch.allclose(reference, replayed, rtol=1e-4, atol=1e-5)

    def _tail(self, x: Tensor, saved: dict[str, object], layer: nn.Module) -> Tensor:
        with ExitStack() as stack:
            for n, out in saved.items():
                stack.enter_context(_swapped(self.model.get_submodule(n), lambda *a, out=out, **k: _clone(out)))
            stack.enter_context(_swapped(self.layer, layer))
            return self.model(x)

    def top1(self, layers: Sequence[nn.Module]) -> list[float]:
        """Top-1 (%) of the model with the layer replaced by each of ``layers`` in turn."""
        return [acc for acc, _ in self.screen(layers)]

    def screen(self, layers: Sequence[nn.Module], threshold: float | None = None) -> list[tuple[float, bool]]:
        """Top-1 (%) of each replacement and whether it is exact.

        With a ``threshold`` (points of top-1), a replacement stops being evaluated as soon as it
        is certain to lose more than that against the original whatever the remaining images
        give; its value is then the most it could still reach (a lower bound of its loss, above
        ``threshold``), and flagged inexact. The decision at ``threshold`` is the same as with
        every image evaluated.
        """
        correct = [0] * len(layers)
        seen = [0] * len(layers)
        active = list(range(len(layers)))
        with _evaluating(self.model):
            for k, (x, y) in enumerate(self.batches):
                if not active:
                    break
                saved = self.recording.saved(k, self.replay) if self.replay else None
                for i in active:
                    if saved is not None:
                        z = self._tail(x, saved, layers[i])
                    else:
                        with _swapped(self.layer, layers[i]):
                            z = self.model(x)
                    correct[i] += int((z.argmax(1) == y).sum())
                    seen[i] += len(y)
                if threshold is not None:
                    active = [i for i in active if self.original_top1 - self._best(correct[i], seen[i]) <= threshold]
        return [(self._best(c, n), n == self.images) for c, n in zip(correct, seen)]

    def _best(self, correct: int, seen: int) -> float:
        return 100.0 * (correct + self.images - seen) / self.images


@dataclass
class ProxyResult:
    """What the proxy measured for one layer: top-1 drop (pp) per evaluated candidate index
    (1-based, as in :class:`LayerCandidates`), and the original's top-1. Indices in ``bounds``
    were stopped early: their drop is a lower bound, above the threshold they were screened at."""

    name: str
    original_top1: float
    drops: dict[int, float]
    bounds: set[int] = field(default_factory=set)

    def verdict(self, i: int, threshold: float) -> bool | None:
        """Whether candidate ``i`` is within ``threshold``, or None if that is not known."""
        return _verdict(self.drops, self.bounds, i, threshold)


def _verdict(drops: dict[int, float], bounds: set[int], i: int, threshold: float) -> bool | None:
    if i not in drops:
        return None
    if i in bounds:
        return False if drops[i] > threshold else None
    return drops[i] <= threshold


def _family_members(cands: LayerCandidates) -> dict[tuple, list[int]]:
    fams: dict[tuple, list[int]] = {}
    for i, spec in enumerate(cands.specs, start=1):
        fams.setdefault(spec.family(), []).append(i)
    return {f: sorted(ix, key=lambda i: cands.specs[i - 1].rank) for f, ix in fams.items()}


def measure_drops(
    model: nn.Module, cands: LayerCandidates, data: Dataset | None, device, threshold: float, exhaustive: bool = False,
    known: ProxyResult | None = None, original_top1: float | None = None, recording: PrefixRecording | None = None,
    derivation: Derivation | None = None,
) -> ProxyResult:
    """Top-1 drops of a layer's candidates, enough of them to place each family's threshold.

    The smallest rank of every family is tried first (when it passes, so does the family), then
    bisection over the ranks of the families that failed; all families advance together, so one
    recording pass per batch serves a round. A candidate certain to fail stops being evaluated
    (its drop is then a lower bound, see :meth:`OneLayerEvaluator.screen`). ``exhaustive``
    evaluates every candidate on every image. Verdicts already in ``known`` are not measured again
    (the model runs only if something is missing). ``recording`` shares the images and the
    recorded outputs between the layers of one model. ``derivation`` derives the candidates' factors
    (the paper's weight SVD when None).
    """
    layer = model.get_submodule(cands.name)
    derivation = derivation or Derivation()
    result = ProxyResult(cands.name, known.original_top1, dict(known.drops), set(known.bounds)) if known is not None else None
    drops = result.drops if result is not None else {}
    bounds = result.bounds if result is not None else set()
    ev: OneLayerEvaluator | None = None

    def evaluator() -> OneLayerEvaluator:
        nonlocal ev, result
        if ev is None:
            ev = OneLayerEvaluator(model, cands.name, data, device, batch_size=BATCH, original_top1=original_top1, recording=recording)
            result = ProxyResult(cands.name, ev.original_top1, drops, bounds)
        return ev

    def known_at(i: int) -> bool:  # exhaustive: only exact drops count
        return i in drops and i not in bounds if exhaustive else _verdict(drops, bounds, i, threshold) is not None

    def run(idx: list[int]) -> None:
        idx = [i for i in dict.fromkeys(idx) if not known_at(i)]
        if not idx:
            return
        e = evaluator()
        mods = [derivation.block(cands.name, layer, [*cands.prefix, cands.specs[i - 1]]).to(device).eval() for i in idx]
        for i, (acc, exact) in zip(idx, e.screen(mods, None if exhaustive else threshold)):
            drops[i] = e.original_top1 - acc
            if exact:
                bounds.discard(i)
            else:
                bounds.add(i)

    fams = _family_members(cands)
    if exhaustive:
        run([i for ix in fams.values() for i in ix])
    else:
        # per family, bisect for the first (smallest-rank) index whose drop is within the threshold
        run([ix[0] for ix in fams.values()])
        # the answer lies in [lo, hi]; hi = len: no rank passes
        span = {f: (0, 0) if drops[ix[0]] <= threshold else (1, len(ix)) for f, ix in fams.items()}
        while True:
            probe = {f: (lo + hi) // 2 for f, (lo, hi) in span.items() if lo < hi}
            if not probe:
                break
            run([fams[f][m] for f, m in probe.items()])
            for f, m in probe.items():
                lo, hi = span[f]
                span[f] = (lo, m) if drops[fams[f][m]] <= threshold else (m + 1, hi)
    if result is None:  # nothing to measure (no candidate)
        evaluator()
    assert result is not None
    return result


def passing(cands: LayerCandidates, result: ProxyResult, threshold: float) -> set[int]:
    """Candidate indices kept at ``threshold``: in each family, every rank from the smallest one
    measured within the threshold upwards (the bisection's monotonicity assumption)."""
    keep: set[int] = set()
    for ix in _family_members(cands).values():
        verdicts = [result.verdict(i, threshold) for i in ix]
        ok = [k for k, v in enumerate(verdicts) if v]
        if all(v is not None for v in verdicts):  # known for every rank: no assumption needed
            keep.update(ix[k] for k in ok)
        elif ok:
            keep.update(ix[min(ok):])
    return keep
