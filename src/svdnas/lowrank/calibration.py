"""Calibration statistics of a layer's inputs: second moments of the input patches each unfolding sees.

A family (first_kernel, groups) unfolds the weight into matrices whose columns are (input channel of
the group, kernel dims held by the first layer); the first layer applies its rows to im2col patches of
the input taken with the first layer's kernel, stride, padding and dilation. The moments here are
E[p p^T] of those patches, in the column order of :func:`svdnas.lowrank.functional.unfold`, kept per
first-layer group (the diagonal blocks) so that a grouped family holds only what it uses. The "full"
moment is that of the original kernel's patches (I*kh*kw, the order of ``weight.reshape(O, -1)``),
which the exact refit needs.

Statistics are float64 sums over every patch (every output position of every image) streamed batch by
batch; a moment is the sum divided by the number of patches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from svdnas.errors import SpecError
from svdnas.lowrank.geometry import ConvGeometry, layer_geometry
from svdnas.lowrank.spec import LowRankSpec

Key = tuple[tuple[int, int], int]  # (first_kernel, first-layer groups)
_CHUNK_ELEMENTS = 1 << 23  # patches materialised at once (64 MiB in float64)


def patches(x: Tensor, geo: ConvGeometry, first_kernel: tuple[int, int] | None = None, *, linear: bool = False) -> Tensor:
    """Im2col patches (positions, I * a_h * a_w) seen by a branch's first layer of ``first_kernel``
    (the original kernel when None), in :func:`~svdnas.lowrank.functional.unfold`'s column order.

    Args:
        x: a batch (N, I, H, W) for a conv, (..., I) for a linear layer.
        linear: the layer is an ``nn.Linear`` (every row of features is a patch).
    """
    if linear:
        return x.reshape(-1, x.shape[-1])
    fk = geo.kernel if first_kernel is None else tuple(first_kernel)
    kw, _ = geo.split(LowRankSpec(fk, (1, 1), 1))  # type: ignore[arg-type]
    padding = kw["padding"]
    if kw["padding_mode"] != "zeros" and any(padding):
        x = TF.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=kw["padding_mode"])
        padding = (0, 0)
    cols = TF.unfold(x, kw["kernel_size"], dilation=kw["dilation"], padding=padding, stride=kw["stride"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _columns(geo: ConvGeometry, first_kernel: tuple[int, int]) -> int:
    return geo.in_channels * first_kernel[0] * first_kernel[1]


def _chunks(x: Tensor, width: int, linear: bool) -> Iterable[Tensor]:
    """The batch split along its first dim so that no chunk's patches exceed the element budget."""
    if x.dim() < 2:
        yield x
        return
    positions = x[0].numel() // (x.shape[-1] if linear else x.shape[1])
    per_image = max(1, positions * width)
    step = max(1, _CHUNK_ELEMENTS // per_image)
    yield from x.split(step)


class _Moments:
    """Sums of products of left and right patches for a set of keys, plus means of the full patches."""

    def __init__(self, geo: ConvGeometry, keys: Iterable[Key], device: torch.device | str | None) -> None:
        self.geo = geo
        self.linear = False
        self.device = device
        wanted = {(tuple(fk), int(g)) for fk, g in keys}
        for fk, g in wanted:
            if any(a not in (1, k) for a, k in zip(fk, geo.kernel)):
                raise SpecError(f"first_kernel {fk} must be, per dimension, 1 or the kernel size {geo.kernel}")
            if geo.in_channels % g:
                raise SpecError(f"first-layer groups {g} do not divide the {geo.in_channels} input channels")
        # a group-1 moment holds every grouped one of the same unfolding: store only it
        self.stored = sorted(k for k in wanted if k[1] == 1 or (k[0], 1) not in wanted)
        self.sums: dict[Key, Tensor] = {}
        self.count = 0  # patches of the original kernel (output positions) seen
        self.counts: dict[tuple[int, int], int] = {}  # patches seen per unfolding (first layer's positions)

    def _zeros(self, key: Key, like: Tensor) -> Tensor:
        fk, g = key
        n = _columns(self.geo, fk) // g
        return torch.zeros(g, n, n, dtype=torch.float64, device=self.device or like.device)

    def _add(self, key: Key, left: Tensor, right: Tensor) -> None:
        g = key[1]
        if key not in self.sums:
            self.sums[key] = self._zeros(key, left)
        acc = self.sums[key]
        left, right = left.to(acc.device), right.to(acc.device)
        n = left.shape[1] // g
        for j in range(g):
            acc[j] += left[:, j * n : (j + 1) * n].T @ right[:, j * n : (j + 1) * n]

    def _moment(self, store: dict[Key, Tensor], first_kernel: tuple[int, int], groups: int) -> Tensor:
        if self.count == 0:
            raise SpecError("no calibration inputs were seen: call update() with at least one batch first")
        fk = tuple(first_kernel)
        if (fk, groups) in store:
            return store[(fk, groups)] / self.counts[fk]
        if (fk, 1) in store:
            full = store[(fk, 1)][0]
            n = full.shape[0] // groups
            return torch.stack([full[j * n : (j + 1) * n, j * n : (j + 1) * n] for j in range(groups)]) / self.counts[fk]
        raise SpecError(f"the moment of first_kernel {fk} with {groups} groups was not requested; ask for it when creating the statistics")

    def nbytes(self) -> int:
        """Bytes the statistics hold (or will hold once fed), moments and means together."""
        total = 0
        for fk, g in self.stored:
            n = _columns(self.geo, fk) // g
            total += g * n * n * 8 * self._copies()
        return total + self._mean_bytes()

    def _copies(self) -> int:
        return 1

    def _mean_bytes(self) -> int:
        return 0


def _keys(geo: ConvGeometry, families: Iterable[tuple[tuple[int, int], tuple[int, int]]], full: bool) -> list[Key]:
    keys = [(tuple(fk), g[0]) for fk, g in families]
    if full:
        keys.append((geo.kernel, 1))
    return keys  # type: ignore[return-value]


class PatchMoments(_Moments):
    """Streamed E[p p^T] of a layer's input patches for the unfoldings asked for.

    Args:
        layer: an ``nn.Conv2d`` (groups=1) or ``nn.Linear``.
        families: (first_kernel, groups) pairs whose whitening is wanted; only the first-layer groups
            matter (a second-layer grouping uses the whole unfolding's moment).
        full: also keep the moment of the original kernel's patches (for the exact refit).
        device: where the sums live (default: the first batch's device).
    """

    def __init__(
        self,
        layer: nn.Module,
        families: Iterable[tuple[tuple[int, int], tuple[int, int]]] = (),
        *,
        full: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        geo = layer_geometry(layer)
        super().__init__(geo, _keys(geo, families, full), device)
        self.linear = isinstance(layer, nn.Linear)
        n = _columns(geo, geo.kernel)
        self.mean_sum = torch.zeros(n, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add a batch of the layer's inputs."""
        unfoldings = sorted({k[0] for k in self.stored} | {self.geo.kernel})
        width = max(_columns(self.geo, fk) for fk in unfoldings)
        for chunk in _chunks(x.detach(), width, self.linear):
            for fk in unfoldings:
                p = patches(chunk, self.geo, fk, linear=self.linear).double()
                self.counts[fk] = self.counts.get(fk, 0) + p.shape[0]
                if fk == self.geo.kernel:
                    dev = self.device or p.device
                    self.mean_sum = self.mean_sum.to(dev) + p.sum(0).to(dev)
                    count = p.shape[0]
                for key in self.stored:
                    if key[0] == fk:
                        self._add(key, p, p)
            self.count += count

    def moment(self, first_kernel: tuple[int, int], groups: int = 1) -> Tensor:
        """E[p p^T] per first-layer group: (groups, n, n), n = I / groups * a_h * a_w."""
        return self._moment(self.sums, first_kernel, groups)

    def full_moment(self) -> Tensor:
        """E[p p^T] of the original kernel's patches: (I * kh * kw, I * kh * kw)."""
        return self.moment(self.geo.kernel, 1)[0]

    def full_mean(self) -> Tensor:
        """E[p] of the original kernel's patches: the layer's output mean is ``W.reshape(O, -1) @ E[p] + b``."""
        return self.mean_sum / max(self.count, 1)

    def _mean_bytes(self) -> int:
        return _columns(self.geo, self.geo.kernel) * 8

    def hook(self, layer: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Feed every input ``layer`` sees from now on (remove the handle when done)."""
        return layer.register_forward_pre_hook(lambda _module, args: self.update(args[0]))


class CrossMoments(_Moments):
    """Streamed moments of one layer's patches under two input streams: the original model's inputs
    ``x_orig`` and those the already-compressed prefix produces, ``x_comp`` (same images, same order).

    Holds E[p_orig p_comp^T] and E[p_comp p_comp^T] per key, and E[p_orig p_orig^T] when ``orig`` is
    set (only needed to report the error's constant term), plus the full patches' means of both.
    """

    def __init__(
        self,
        layer: nn.Module,
        families: Iterable[tuple[tuple[int, int], tuple[int, int]]] = (),
        *,
        full: bool = False,
        orig: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        geo = layer_geometry(layer)
        super().__init__(geo, _keys(geo, families, full), device)
        self.linear = isinstance(layer, nn.Linear)
        self.keep_orig = orig
        self.comp_sums: dict[Key, Tensor] = {}
        self.orig_sums: dict[Key, Tensor] = {}
        n = _columns(geo, geo.kernel)
        self.mean_sums = [torch.zeros(n, dtype=torch.float64, device=device) for _ in range(2)]

    @torch.no_grad()
    def update(self, x_orig: Tensor, x_comp: Tensor) -> None:
        """Add a batch of the layer's inputs under both streams."""
        if x_orig.shape != x_comp.shape:
            raise SpecError(f"the two input streams differ in shape: {tuple(x_orig.shape)} vs {tuple(x_comp.shape)}")
        keys = self.stored
        unfoldings = sorted({k[0] for k in keys} | {self.geo.kernel})
        width = max(_columns(self.geo, fk) for fk in unfoldings)
        for xo, xc in zip(_chunks(x_orig.detach(), width, self.linear), _chunks(x_comp.detach(), width, self.linear)):
            for fk in unfoldings:
                po, pc = (patches(t, self.geo, fk, linear=self.linear).double() for t in (xo, xc))
                self.counts[fk] = self.counts.get(fk, 0) + po.shape[0]
                if fk == self.geo.kernel:
                    dev = self.device or po.device
                    self.mean_sums = [m.to(dev) + p.sum(0).to(dev) for m, p in zip(self.mean_sums, (po, pc))]
                    count = po.shape[0]
                for key in keys:
                    if key[0] != fk:
                        continue
                    self._add(key, po, pc)
                    self._add_to(self.comp_sums, key, pc, pc)
                    if self.keep_orig:
                        self._add_to(self.orig_sums, key, po, po)
            self.count += count

    def _add_to(self, store: dict[Key, Tensor], key: Key, left: Tensor, right: Tensor) -> None:
        saved, self.sums = self.sums, store
        try:
            self._add(key, left, right)
        finally:
            self.sums = saved

    def cross(self, first_kernel: tuple[int, int], groups: int = 1) -> Tensor:
        """E[p_orig p_comp^T] per first-layer group: (groups, n, n)."""
        return self._moment(self.sums, first_kernel, groups)

    def comp(self, first_kernel: tuple[int, int], groups: int = 1) -> Tensor:
        """E[p_comp p_comp^T] per first-layer group: (groups, n, n)."""
        return self._moment(self.comp_sums, first_kernel, groups)

    def orig(self, first_kernel: tuple[int, int], groups: int = 1) -> Tensor:
        """E[p_orig p_orig^T] per first-layer group (only with ``orig=True``)."""
        if not self.keep_orig:
            raise SpecError("E[p_orig p_orig^T] was not kept: create the CrossMoments with orig=True")
        return self._moment(self.orig_sums, first_kernel, groups)

    def full_means(self) -> tuple[Tensor, Tensor]:
        """(E[p_orig], E[p_comp]) of the original kernel's patches."""
        return tuple(m / max(self.count, 1) for m in self.mean_sums)  # type: ignore[return-value]

    def _copies(self) -> int:
        return 3 if self.keep_orig else 2

    def _mean_bytes(self) -> int:
        return 2 * _columns(self.geo, self.geo.kernel) * 8


def needed_families(specs: Iterable[LowRankSpec]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The distinct families of ``specs`` (what a :class:`PatchMoments` must be asked for)."""
    return sorted({s.family() for s in specs})


def moments_for(layer: nn.Module, specs: Iterable[LowRankSpec], derivation: str, **kw) -> PatchMoments:
    """An empty :class:`PatchMoments` holding exactly what ``derive(layer, specs, derivation)`` reads."""
    specs = list(specs)
    if derivation == "weight":
        return PatchMoments(layer, (), **kw)
    return PatchMoments(layer, needed_families(specs), full=derivation == "refit", **kw)
