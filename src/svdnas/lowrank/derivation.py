"""How a job derives every candidate's factors: the paper's plain SVD of the weight, or output-aware
factors fitted to calibration statistics of each layer's inputs (see :mod:`svdnas.lowrank.whiten`).

One :class:`Derivation` serves the proxies, the super blocks and the final model alike, so that the
search compares the very factors the compressed model will hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from svdnas.errors import SpecError
from svdnas.hooks import forward_hooks
from svdnas.lowrank import functional as F
from svdnas.lowrank.calibration import PatchMoments
from svdnas.lowrank.decompose import decompose
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.modules import LowRankBlock
from svdnas.lowrank.spec import LowRankSpec
from svdnas.lowrank.whiten import Whitening, branch_weight, derive, whitened_svd

# "prefix": the search compares whitened factors; the chosen plan's layers are then fitted in order on
# the compressed prefix's inputs, with their biases corrected (svdnas.surgery.prefix)
KINDS = ("weight", "whitened", "refit", "prefix")


@dataclass
class Derivation:
    """The derivation of a job and, for the output-aware kinds, each target layer's input statistics.

    Attributes:
        kind: ``weight`` (the paper's truncated SVD of the unfolded weight), ``whitened`` (the SVD of
            the weight times the square root of the input patches' second moment), ``refit``
            (whitened, then alternating least squares on the layer's true output error) or ``prefix``
            (whitened here; the final model's layers are then fitted in order on the compressed
            prefix's inputs, exactly where the pooled moments approximate, biases corrected).
        stats: per dotted layer name, its calibration moments (empty for ``weight``).
        damping: relative damping of the moments before their square roots are taken.
        refit_iters: alternating least-squares steps of the exact refits (``refit``; ``prefix``'s fit of
            the families whose pooled fit is an approximation).
    """

    kind: str = "weight"
    stats: dict[str, PatchMoments] = field(default_factory=dict)
    damping: float = 1e-6
    refit_iters: int = 4
    # the square roots of the moments, kept (most recently used last) up to ``whitening_bytes``: the
    # proxies, the supernet and the final model each go layer by layer over the same unfoldings, and
    # an eigendecomposition of a 2304-column moment takes seconds
    whitening_bytes: int = 1 << 30
    _whitenings: dict[tuple, Whitening] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(f"--derivation must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def plain(self) -> bool:
        return self.kind == "weight"

    @property
    def factor_kind(self) -> str:
        """How a single layer's factors are derived (the prefix fit starts from whitened ones)."""
        return "whitened" if self.kind == "prefix" else self.kind

    @property
    def fits_prefix(self) -> bool:
        return self.kind == "prefix"

    def _stats(self, name: str) -> PatchMoments:
        if name not in self.stats:
            raise SpecError(f"the {self.kind!r} derivation has no calibration statistics for layer {name}")
        return self.stats[name]

    def whitening(self, name: str, first_kernel: tuple[int, int], groups: int) -> Whitening:
        """The :class:`~svdnas.lowrank.whiten.Whitening` of layer ``name``'s moment for that unfolding
        and first-layer grouping, computed once while the cache (``whitening_bytes``) can hold it."""
        key = (name, tuple(first_kernel), groups)
        found = self._whitenings.pop(key, None) or Whitening(self._stats(name).moment(first_kernel, groups), self.damping)
        held = found.nbytes() + sum(w.nbytes() for w in self._whitenings.values())
        for old in list(self._whitenings):  # the least recently used go first
            if held <= self.whitening_bytes:
                break
            held -= self._whitenings.pop(old).nbytes()
        self._whitenings[key] = found
        return found

    def block(self, name: str, layer: nn.Module, specs: Sequence[LowRankSpec]) -> LowRankBlock:
        """``layer`` (dotted ``name``) as the low-rank block of ``specs``."""
        if self.plain:
            return decompose(layer, specs)
        block = derive(layer, specs, self.factor_kind, self._stats(name), damping=self.damping, refit_iters=self.refit_iters,
                       whitening=lambda fk, g: self.whitening(name, fk, g))
        return block.to(dtype=layer.weight.dtype)

    def dense(self, name: str, layer: nn.Module, specs: Sequence[LowRankSpec]) -> Tensor:
        """The dense weight (O, I, kh, kw) that the branches ``specs`` of ``layer`` stand for together."""
        weight = conv_weight(layer).detach()
        if self.plain or not specs:
            return F.branches_weight(weight, specs)
        block = derive(layer, specs, self.factor_kind, self._stats(name), damping=self.damping,
                       whitening=lambda fk, g: self.whitening(name, fk, g))
        with torch.no_grad():  # a constant of the second search, as the weight derivation's is
            total = sum(branch_weight(b.first.weight, b.second.weight, b.spec, weight.shape) for b in block.branches)
        return total.to(weight.dtype)

    def factors(self, name: str, weight: Tensor, family: F.Family) -> F.SVDFactors:
        """The factors of ``weight`` (a layer's, or a residual of it) from which every rank of ``family`` is taken.

        For the output-aware kinds these are whitened (the super blocks mix windows of them); a
        refit is per rank and so is applied to the chosen candidates only.
        """
        if self.plain:
            return F.svd(weight, *family)
        fk, groups = family
        u, s, vh = whitened_svd(weight.double(), family, self.whitening(name, fk, groups[0]))
        return F.SVDFactors(u.to(weight.dtype), s.to(weight.dtype), vh.to(weight.dtype))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    kind: str,
    layer_specs: Mapping[str, Iterable[LowRankSpec]],
    images: Iterable[Tensor],
    device: torch.device | str,
    damping: float = 1e-6,
) -> Derivation:
    """One forward pass of ``model`` over ``images`` (batches), accumulating each named layer's input
    moments for the families of its specs (and the full moment for ``refit``).

    Nothing is measured for ``weight``.
    """
    derivation = Derivation(kind, {}, damping)
    if derivation.plain:
        return derivation
    for name, specs in layer_specs.items():
        families = sorted({s.family() for s in specs})
        derivation.stats[name] = PatchMoments(model.get_submodule(name), families, full=kind == "refit")
    feeds = ((model.get_submodule(n), lambda m, a, s=s: s.update(a[0])) for n, s in derivation.stats.items())
    was_training = model.training
    model.eval()
    try:
        with forward_hooks(feeds, pre=True):
            for x in images:
                model(x.to(device))
    finally:
        model.train(was_training)
    return derivation


def statistics_bytes(derivation: Derivation) -> int:
    """The memory the calibration moments hold."""
    return sum(s.nbytes() for s in derivation.stats.values())
