"""The one-layer accuracy proxy: a candidate is kept only if compressing its layer alone, the
rest of the network untouched, costs at most ``threshold`` points of top-1 on the proxy images.

Two things keep it fast.

* **Prefix replay.** Every module that finishes before the target layer starts computes the same
  output whatever the candidate, so one forward pass per batch records those outputs and the
  candidates' passes replay them: only the target layer and what runs after it is recomputed.
  This works on any ``nn.Module`` (no tracing): modules are ordered by hooks, and a module is
  replayed only if it runs once per forward pass and returns tensors. Whether the replay is
  faithful is checked on the first batch (the original layer through the replay must give the
  original logits); when it is not, every pass runs in full.
  The recorded outputs are kept between calls (a layer is evaluated in a few rounds of
  candidates) while they fit in ``cache_mib``; beyond it every call records them again.
* **Search by rank.** Within a family (split and grouping) the candidates are truncations of one
  SVD, so a larger rank approximates the layer better; the proxy assumes the accuracy drop falls
  with the rank and finds each family's smallest acceptable rank by bisection, evaluating about
  log2(n) of its n ranks instead of all of them (``exhaustive=True`` evaluates them all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from svdnas.decompose import decompose
from svdnas.evaluate import batches
from svdnas.search.candidates import LayerCandidates

log = logging.getLogger(__name__)


def _tensors_only(out) -> bool:
    if isinstance(out, Tensor):
        return True
    return isinstance(out, tuple) and len(out) > 0 and all(isinstance(t, Tensor) for t in out)


def _clone(out):
    return out.clone() if isinstance(out, Tensor) else tuple(t.clone() for t in out)


def _nbytes(saved: dict[str, object]) -> int:
    outs = [t for out in saved.values() for t in ((out,) if isinstance(out, Tensor) else out)]  # type: ignore[union-attr]
    return sum(t.numel() * t.element_size() for t in outs)


@torch.no_grad()
def replayable_modules(model: nn.Module, target: str, x: Tensor) -> list[str]:
    """The outermost modules that finish before ``target`` starts, run once per forward pass and
    return tensors: their outputs do not depend on what ``target`` computes."""
    order: dict[str, list[int]] = {}
    ends: dict[str, int] = {}
    tensor_out: dict[str, bool] = {}
    clock = [0]
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def pre(m, a, name=name):
            order.setdefault(name, []).append(clock[0])
            clock[0] += 1

        def post(m, a, out, name=name):
            ends[name] = clock[0]
            tensor_out[name] = _tensors_only(out)
            clock[0] += 1

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if target not in order:
        raise ValueError(f"{target} is not called in the model's forward pass")
    start = order[target][0]
    ok = {n for n, calls in order.items() if len(calls) == 1 and ends[n] < start and tensor_out[n]}
    return [n for n in ok if n.rpartition(".")[0] not in ok]


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


class OneLayerEvaluator:
    """Top-1 of ``model`` on ``data`` with the layer ``name`` replaced, reusing the prefix.

    Args:
        model: the original model (left as it was after every call).
        name: dotted name of the layer to replace.
        data: labelled proxy images.
        device: where to run.
        batch_size: images per pass.
        original_top1: the unmodified model's top-1 on ``data``, if known (it is the same for
            every layer).
        cache_mib: most memory the replayed outputs of all batches may take to be kept between
            calls (0: record them again on every call).
    """

    def __init__(
        self, model: nn.Module, name: str, data: Dataset, device, batch_size: int = 256, original_top1: float | None = None,
        cache_mib: float = 1024.0,
    ) -> None:
        self.model, self.name, self.device = model, name, device
        self.layer = model.get_submodule(name)
        self.batches = [(x.to(device), y.to(device)) for x, y in batches(data, batch_size)]
        if not self.batches:
            raise ValueError("the accuracy proxy needs at least one image")
        self.images = sum(len(y) for _, y in self.batches)
        was_training = model.training
        model.eval()
        try:
            self.replay = replayable_modules(model, name, self.batches[0][0][:2])
            if original_top1 is None:
                with torch.no_grad():
                    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in self.batches)
                original_top1 = 100.0 * correct / self.images
            self.original_top1 = original_top1
            self._cache: list[dict[str, object]] | None = None
            if self.replay:
                x0 = self.batches[0][0]
                with torch.no_grad():
                    saved, reference = self._record(x0)
                    replayed = self._tail(x0, saved, self.layer)
                if not torch.allclose(reference, replayed, rtol=1e-4, atol=1e-5):
                    log.warning("%s: replaying the layers before it does not reproduce the model's output; running in full", name)
                    self.replay = []
                elif _nbytes(saved) * len(self.batches) <= cache_mib * 2**20:
                    self._cache = [saved]
        finally:
            model.train(was_training)

    def _saved(self, k: int) -> dict[str, object]:
        """The replayed modules' outputs for batch ``k``: from the cache, or a recording pass."""
        if self._cache is None:
            return self._record(self.batches[k][0])[0]
        if k == len(self._cache):
            self._cache.append(self._record(self.batches[k][0])[0])
        return self._cache[k]

    def _record(self, x: Tensor) -> tuple[dict[str, object], Tensor]:
        """A full pass that keeps a copy of each replayable module's output."""
        saved: dict[str, object] = {}
        handles = [
            self.model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: saved.__setitem__(n, _clone(out)))
            for n in self.replay
        ]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return saved, logits

    def _tail(self, x: Tensor, saved: dict[str, object], layer: nn.Module) -> Tensor:
        with ExitStack() as stack:
            for n, out in saved.items():
                stack.enter_context(_swapped(self.model.get_submodule(n), lambda *a, out=out, **k: _clone(out)))
            stack.enter_context(_swapped(self.layer, layer))
            return self.model(x)

    @torch.no_grad()
    def top1(self, layers: Sequence[nn.Module]) -> list[float]:
        """Top-1 (%) of the model with the layer replaced by each of ``layers`` in turn."""
        was_training = self.model.training
        self.model.eval()
        correct = [0] * len(layers)
        try:
            for k, (x, y) in enumerate(self.batches):
                saved = self._saved(k) if self.replay else None
                for i, layer in enumerate(layers):
                    if saved is not None:
                        z = self._tail(x, saved, layer)
                    else:
                        with _swapped(self.layer, layer):
                            z = self.model(x)
                    correct[i] += int((z.argmax(1) == y).sum())
        finally:
            self.model.train(was_training)
        return [100.0 * c / self.images for c in correct]


@dataclass
class ProxyResult:
    """What the proxy measured for one layer: top-1 drop (pp) per evaluated candidate index
    (1-based, as in :class:`LayerCandidates`), and the original's top-1."""

    name: str
    original_top1: float
    drops: dict[int, float]


def _family_members(cands: LayerCandidates) -> dict[tuple, list[int]]:
    fams: dict[tuple, list[int]] = {}
    for i, spec in enumerate(cands.specs, start=1):
        fams.setdefault(spec.family(), []).append(i)
    return {f: sorted(ix, key=lambda i: cands.specs[i - 1].rank) for f, ix in fams.items()}


def measure_drops(
    model: nn.Module, cands: LayerCandidates, data: Dataset, device, threshold: float, exhaustive: bool = False,
    known: ProxyResult | None = None, original_top1: float | None = None,
) -> ProxyResult:
    """Top-1 drops of a layer's candidates, enough of them to place each family's threshold.

    The smallest rank of every family is tried first (when it passes, so does the family), then
    bisection over the ranks of the families that failed; all families advance together, so one
    recording pass per batch serves a round. ``exhaustive`` evaluates every candidate. Drops already
    in ``known`` are not measured again (the model runs only if something is missing).
    """
    layer = model.get_submodule(cands.name)
    result = ProxyResult(cands.name, known.original_top1, dict(known.drops)) if known is not None else None
    drops = result.drops if result is not None else {}
    ev: OneLayerEvaluator | None = None

    def run(idx: list[int]) -> None:
        nonlocal ev, result
        idx = [i for i in dict.fromkeys(idx) if i not in drops]
        if not idx:
            return
        if ev is None:
            ev = OneLayerEvaluator(model, cands.name, data, device, original_top1=original_top1)
            result = ProxyResult(cands.name, ev.original_top1, drops)
        mods = [decompose(layer, [*cands.prefix, cands.specs[i - 1]]).to(device).eval() for i in idx]
        for i, acc in zip(idx, ev.top1(mods)):
            drops[i] = ev.original_top1 - acc

    fams = _family_members(cands)
    if exhaustive:
        run([i for ix in fams.values() for i in ix])
    else:
        # per family, bisect for the first (smallest-rank) index whose drop is within the threshold
        run([ix[0] for ix in fams.values()])
        # the answer lies in [lo, hi]; hi = len: no rank passes
        bounds = {f: (0, 0) if drops[ix[0]] <= threshold else (1, len(ix)) for f, ix in fams.items()}
        while True:
            probe = {f: (lo + hi) // 2 for f, (lo, hi) in bounds.items() if lo < hi}
            if not probe:
                break
            run([fams[f][m] for f, m in probe.items()])
            for f, m in probe.items():
                lo, hi = bounds[f]
                bounds[f] = (lo, m) if drops[fams[f][m]] <= threshold else (m + 1, hi)
    if result is None:  # nothing to measure (no candidate)
        ev = OneLayerEvaluator(model, cands.name, data, device, original_top1=original_top1)
        result = ProxyResult(cands.name, ev.original_top1, drops)
    return result


def passing(cands: LayerCandidates, result: ProxyResult, threshold: float) -> set[int]:
    """Candidate indices kept at ``threshold``: in each family, every rank from the smallest one
    measured within the threshold upwards (the bisection's monotonicity assumption)."""
    keep: set[int] = set()
    for ix in _family_members(cands).values():
        ok = [k for k, i in enumerate(ix) if i in result.drops and result.drops[i] <= threshold]
        if all(i in result.drops for i in ix):  # measured in full: no assumption needed
            keep.update(ix[k] for k in ok)
        elif ok:
            keep.update(ix[min(ok):])
    return keep
