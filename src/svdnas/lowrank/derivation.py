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
from svdnas.hooks import evaluation_mode, forward_hooks
from svdnas.lowrank import functional as F
from svdnas.lowrank.calibration import PatchMoments, Sampling
from svdnas.lowrank.decompose import decompose
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.modules import LowRankBlock
from svdnas.lowrank.spec import LowRankSpec
from svdnas.lowrank.whiten import (
    Whitening,
    branch_weight,
    derive,
    singular_values,
    whitened_matrices,
    whitened_spectrum,
    whitened_svd,
)

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
        refit_iters: alternating least-squares steps of ``refit``'s exact refits.
        prefix_refit_iters: those of ``prefix``'s fit, for the families whose pooled fit is an
            approximation. Two steps gave the same top-1 as four, or up to 6 test images more, on
            ``zoo:resnet18`` at 40-70% FLOPs, ``zoo:efficientnet_b0`` at 10-40% and ``zoo:mobilenetv2`` at
            20-40%, the fit 0.2-5.5 s shorter on the first (2026-12-04,
            ``benchmarks/diagnostics/prefix_refit_iters.py``).
        sampling: which of the calibration images' patches the moments summed (None: every one); the
            prefix fit takes its own at the same patches per column.
    """

    kind: str = "weight"
    stats: dict[str, PatchMoments] = field(default_factory=dict)
    damping: float = 1e-6
    refit_iters: int = 4
    prefix_refit_iters: int = 2
    sampling: Sampling | None = None
    # the square roots of the moments, kept (most recently used last) up to ``whitening_bytes``: the
    # proxies, the supernet and the final model each go layer by layer over the same unfoldings, and
    # a square root of a 2304-column moment is not free
    whitening_bytes: int = 1 << 30
    # each family's whitened factors of the layer's weight, kept likewise: the accuracy proxy derives
    # every rank it measures, the super blocks and the prefix fit's comparison the same families again
    factors_bytes: int = 1 << 29
    _whitenings: dict[tuple, Whitening] = field(default_factory=dict, init=False, repr=False, compare=False)
    _factors: dict[tuple, tuple[Tensor, F.SVDFactors]] = field(default_factory=dict, init=False, repr=False, compare=False)
    # the whitened ungrouped matrices of a layer's weight per unfolding (spectra of grouped second layers)
    _whitened_mats: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        return _kept(self._whitenings, key, lambda: Whitening(self._stats(name).moment(first_kernel, groups), self.damping),
                     lambda w: w.nbytes(), self.whitening_bytes)

    def _whitened(self, name: str, weight: Tensor, family: F.Family) -> F.SVDFactors:
        """Float64 whitened factors of ``weight`` (the layer's, or a residual of it) for ``family``,
        kept while ``factors_bytes`` allows (a hit needs the same weight, compared entry by entry)."""
        weight = weight.detach().double()
        found = self._found(name, weight, family)
        if found is not None:
            self._factors[(name, family)] = self._factors.pop((name, family))  # most recently used last
            return found
        fk, groups = family
        factors = whitened_svd(weight, family, self.whitening(name, fk, groups[0]))
        entry = (weight.clone(), factors)
        return _kept(self._factors, (name, family), lambda: entry, _entry_bytes, self.factors_bytes, replace=True)[1]

    def _found(self, name: str, weight: Tensor, family: F.Family) -> F.SVDFactors | None:
        return _for_weight(self._factors, (name, family), weight)

    def block(self, name: str, layer: nn.Module, specs: Sequence[LowRankSpec]) -> LowRankBlock:
        """``layer`` (dotted ``name``) as the low-rank block of ``specs``."""
        if self.plain:
            return decompose(layer, specs)
        block = derive(layer, specs, self.factor_kind, self._stats(name), damping=self.damping, refit_iters=self.refit_iters,
                       whitening=lambda fk, g: self.whitening(name, fk, g), factors=lambda w, fam: self._whitened(name, w, fam))
        return block.to(dtype=layer.weight.dtype)

    def dense(self, name: str, layer: nn.Module, specs: Sequence[LowRankSpec]) -> Tensor:
        """The dense weight (O, I, kh, kw) that the branches ``specs`` of ``layer`` stand for together."""
        weight = conv_weight(layer).detach()
        if self.plain or not specs:
            return F.branches_weight(weight, specs)
        block = derive(layer, specs, self.factor_kind, self._stats(name), damping=self.damping,
                       whitening=lambda fk, g: self.whitening(name, fk, g), factors=lambda w, fam: self._whitened(name, w, fam))
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
        u, s, vh = self._whitened(name, weight, family)
        return F.SVDFactors(u.to(weight.dtype), s.to(weight.dtype), vh.to(weight.dtype))

    def spectrum(self, name: str, weight: Tensor, family: F.Family) -> Tensor:
        """The singular values (g, k) of :meth:`factors`, in float64, without computing the factors
        (for the output-aware kinds: the eigenvalues of a Gram matrix of the whitened weight)."""
        if self.plain:
            return F.svd(weight, *family).s.double()
        weight = weight.detach().double()
        found = self._found(name, weight, family)
        if found is not None:
            return found.s
        fk, (g1, g2) = family
        if g2 == 1:
            return whitened_spectrum(weight, family, self.whitening(name, fk, g1))
        # a grouped second layer's matrices are row blocks of the ungrouped family's, and so are
        # their products with the moment's root: one product serves every g2 of the unfolding
        key = (name, tuple(fk))
        x = _for_weight(self._whitened_mats, key, weight)
        if x is None:
            entry = (weight.clone(), whitened_matrices(weight, (fk, (1, 1)), self.whitening(name, fk, 1)))
            x = _kept(self._whitened_mats, key, lambda: entry, _entry_bytes, self.factors_bytes, replace=True)[1]
        else:
            self._whitened_mats[key] = self._whitened_mats.pop(key)  # most recently used last
        return singular_values(x.reshape(g2, -1, x.shape[-1]))


def _for_weight(cache: dict, key, weight: Tensor):
    """What ``cache[key]`` holds for ``weight`` (its entries are (weight, value), the weight compared
    entry by entry), or None."""
    found = cache.get(key)
    if found is not None and found[0].shape == weight.shape and torch.equal(found[0], weight):
        return found[1]
    return None


def _entry_bytes(entry: tuple[Tensor, F.SVDFactors | Tensor]) -> int:
    tensors = (entry[1],) if isinstance(entry[1], Tensor) else tuple(entry[1])
    return sum(t.numel() * t.element_size() for t in (entry[0], *tensors))


def _kept(cache: dict, key, make, nbytes, budget: int, *, replace: bool = False):
    """``cache[key]`` (made by ``make()`` when missing, or always with ``replace``), moved to the end
    (most recently used); the least recently used entries are dropped while the whole exceeds ``budget``."""
    found = cache.pop(key, None)
    if found is None or replace:
        found = make()
    held = nbytes(found) + sum(nbytes(v) for v in cache.values())
    for old in list(cache):
        if held <= budget:
            break
        held -= nbytes(cache.pop(old))
    cache[key] = found
    return found


@torch.no_grad()
def calibrate(
    model: nn.Module,
    kind: str,
    layer_specs: Mapping[str, Iterable[LowRankSpec]],
    images: Iterable[Tensor],
    device: torch.device | str,
    damping: float = 1e-6,
    *,
    sampling: Sampling | None = None,
) -> Derivation:
    """One forward pass of ``model`` over ``images`` (batches), accumulating each named layer's input
    moments for the families of its specs (and the full moment for ``refit``), over the patches
    ``sampling`` keeps (every one when None; its ``images`` must be those ``images`` hold).

    Nothing is measured for ``weight``.
    """
    derivation = Derivation(kind, {}, damping, sampling=sampling)
    if derivation.plain:
        return derivation
    for name, specs in layer_specs.items():
        families = sorted({s.family() for s in specs})
        derivation.stats[name] = PatchMoments(model.get_submodule(name), families, full=kind == "refit", sampling=sampling)
    feeds = ((model.get_submodule(n), lambda m, a, s=s: s.update(a[0])) for n, s in derivation.stats.items())
    with evaluation_mode(model), forward_hooks(feeds, pre=True):
        for x in images:
            model(x.to(device))
    return derivation


def statistics_bytes(derivation: Derivation) -> int:
    """The memory the calibration moments hold."""
    return sum(s.nbytes() for s in derivation.stats.values())
