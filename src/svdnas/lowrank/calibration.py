"""Calibration statistics of a layer's inputs: second moments of the input patches each unfolding sees.

A family (first_kernel, groups) unfolds the weight into matrices whose columns are (input channel of
the group, kernel dims held by the first layer); the first layer applies its rows to im2col patches of
the input taken with the first layer's kernel, stride, padding and dilation. The moments here are
E[p p^T] of those patches, in the column order of :func:`svdnas.lowrank.functional.unfold`, kept per
first-layer group (the diagonal blocks) so that a grouped family holds only what it uses. The "full"
moment is that of the original kernel's patches (I*kh*kw, the order of ``weight.reshape(O, -1)``),
which the exact refit needs.

Statistics are float64 sums over the patches (output positions of every image) streamed batch by
batch; a moment is the sum divided by the number of patches. With a :class:`Sampling` a moment sums
every ``step``-th patch of the stream instead, the step chosen per unfolding so that it still sums
at least ``per_column`` patches per column: an early layer of a small network sees over a thousand
patches per column in 512 images, and its products dominate the statistics' cost. The products are taken in the
activations' own precision (float32 for a float32 model; float64 for a float64 one) over blocks of at
most ``_GEMM_ROWS`` patches and each block's sum is added in float64, so the rounding error of a
moment's entry is that of a float32 sum of a few thousand terms (about 1e-7 relative; the whitening's
damping is 1e-6 of the mean eigenvalue), at about half the cost of float64 products. A moment of
one stream (E[p p^T]) is symmetric and only its blocks on and above the diagonal are multiplied.
Patches are copied out with the channels of one kernel offset side by side where no first-layer
group needs unfold's column order, and the sums are put in that order when read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from math import gcd, prod
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from svdnas.errors import SpecError
from svdnas.lowrank.geometry import ConvGeometry, layer_geometry
from svdnas.lowrank.spec import LowRankSpec

Key = tuple[tuple[int, int], int]  # (first_kernel, first-layer groups)
_CHUNK_ELEMENTS = 1 << 23  # patches materialised at once (32 MiB in float32)
_GEMM_ROWS = 4096  # patches per product summed in the activations' precision before the float64 sum
_COLUMN_BLOCKS = 8  # column blocks of a symmetric product: only those on and above the diagonal are computed
# (eight: 4% less time than four at 2304 columns, the same below; benchmarks/diagnostics/calibration_layout.py)
_BLOCK_COLUMNS = 128  # least width of a block


PATCHES_PER_COLUMN = 256  # the default Sampling's floor


@dataclass(frozen=True)
class Sampling:
    """Every ``step``-th patch of a layer's input stream, counted over the ``images`` that will be fed
    (image after image, position after position, across batches), with ``step`` the largest that
    still leaves at least ``per_column`` patches per column of the moment and has no common factor
    with the positions per image; 1 (every patch) where there are fewer. Being coprime, the positions
    kept move from one image to the next, and every ``step`` images keep each position once: a step
    dividing the positions (49 of 784) would keep the same few positions of every image. The step
    depends on the unfolding (its positions and columns), not on the batches.
    """

    images: int
    per_column: int = PATCHES_PER_COLUMN

    def __post_init__(self) -> None:
        if self.images < 1 or self.per_column < 1:
            raise SpecError(f"sampling needs positive images and patches per column, got {self.images} and {self.per_column}")

    def step(self, positions: int, columns: int) -> int:
        """The step for an unfolding of ``columns`` columns with ``positions`` patches per image."""
        step = max(1, self.images * positions // (self.per_column * columns))
        while step > 1 and gcd(step, positions) > 1:
            step -= 1
        return step


def sampling(images: int, per_column: int | None) -> Sampling | None:
    """The :class:`Sampling` of ``per_column`` patches per column over ``images`` images; None (every
    patch) for ``per_column`` 0 or None, or no image."""
    return Sampling(images, per_column) if per_column and images else None


def working_precision(x: Tensor) -> Tensor:
    """Patches in the precision their products are taken in: float64 stays, anything else is float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def column_sums(x: Tensor) -> Tensor:
    """The float64 sum of ``x``'s rows, each block of ``_GEMM_ROWS`` rows summed in ``x``'s precision."""
    return sum((rows.sum(0).double() for rows in x.split(_GEMM_ROWS)), torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))


def gram(left: Tensor, right: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``left^T @ right`` in float64 (``right`` None: ``left^T @ left``, symmetric), the products in
    ``left``'s precision over row blocks of at most ``_GEMM_ROWS``, each block's sum added in float64:
    to ``out`` where given (a float64 sum to add to, symmetric for a symmetric product), which is returned."""
    n = left.shape[1]
    if out is None:
        out = torch.zeros(n, right.shape[1] if right is not None else n, dtype=torch.float64, device=left.device)
    if right is not None:
        for lo, ro in zip(left.split(_GEMM_ROWS), right.split(_GEMM_ROWS)):
            out.add_(lo.T @ ro)
        return out
    block = max(_BLOCK_COLUMNS, -(-n // _COLUMN_BLOCKS))
    edges = list(range(0, n, block)) + [n] if n > 2 * block else [0, n]
    spans = list(pairwise(edges))
    for rows in left.split(_GEMM_ROWS):
        for i0, i1 in spans:
            # the blocks right of the diagonal in one product: columns i0.. of the rows' block
            out[i0:i1, i0:].add_(rows[:, i0:i1].T @ rows[:, i0:])
    for i0, i1 in spans[:-1]:  # mirror the blocks above the diagonal
        out[i1:, i0:i1] = out[i0:i1, i1:].T
    return out


def unfolded(x: Tensor, geo: ConvGeometry, first_kernel: tuple[int, int] | None = None, *, linear: bool = False) -> Tensor:
    """Im2col patches seen by a branch's first layer of ``first_kernel`` (the original kernel when
    None) as a strided view (images, out_h, out_w, I, a_h, a_w) of the padded input in channels-last
    layout, nothing copied but the padded input: flattened, a position's columns are in
    :func:`~svdnas.lowrank.functional.unfold`'s order, and :func:`take_rows` copies out only the
    patches it is asked for, in one pass (``F.unfold`` would write every patch, then a transposed
    copy of them).

    Args:
        x: a batch (N, I, H, W) for a conv, (N, ..., I) for a linear layer (one image's rows of features
            are its positions: the view is (images, rows, 1, features)).
        linear: the layer is an ``nn.Linear``.
    """
    if linear:
        return _per_image(x)
    fk = geo.kernel if first_kernel is None else tuple(first_kernel)
    kw, _ = geo.split(LowRankSpec(fk, (1, 1), 1))  # type: ignore[arg-type]
    (ph, pw), (sh, sw), (dh, dw) = kw["padding"], kw["stride"], kw["dilation"]
    if kw["padding_mode"] != "zeros" and (ph or pw):
        x = TF.pad(x, (pw, pw, ph, ph), mode=kw["padding_mode"])
        ph = pw = 0
    padded = TF.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()
    n, hp, wp, channels = padded.shape
    out_h, out_w = (hp - dh * (fk[0] - 1) - 1) // sh + 1, (wp - dw * (fk[1] - 1) - 1) // sw + 1
    s_n, s_h, s_w, _ = padded.stride()
    return padded.as_strided((n, out_h, out_w, channels, fk[0], fk[1]), (s_n, sh * s_h, sw * s_w, 1, dh * s_h, dw * s_w))


def _per_image(x: Tensor) -> Tensor:
    """Rows of features (N, ..., F) as a view (N, rows per image, 1, F) with the patches' layout (an
    image's rows are its positions); one image for a single row (F,)."""
    return x.reshape(x.shape[0] if x.dim() > 1 else 1, -1, 1, x.shape[-1])


def _positions(view: Tensor) -> int:
    """Patches per image of a view (images, height, width, columns...)."""
    return view.shape[1] * view.shape[2]


def take_rows(view: Tensor, start: int = 0, step: int = 1) -> Tensor:
    """Rows ``start, start + step, ...`` of ``view`` (images, height, width, columns...), positions
    counted image after image and row-major within an image, as (rows, columns): a copy of those
    rows only."""
    n, _, width = view.shape[:3]
    positions = _positions(view)
    if step == 1 and start == 0:
        return view.reshape(n * positions, -1)
    index = torch.arange(start, n * positions, step, device=view.device)
    at = index % positions
    return view[index // positions, at // width, at % width].reshape(len(index), -1)


def patches(x: Tensor, geo: ConvGeometry, first_kernel: tuple[int, int] | None = None, *, linear: bool = False) -> Tensor:
    """Im2col patches (positions, I * a_h * a_w) seen by a branch's first layer of ``first_kernel``
    (the original kernel when None), in :func:`~svdnas.lowrank.functional.unfold`'s column order.

    Args:
        x: a batch (N, I, H, W) for a conv, (..., I) for a linear layer.
        linear: the layer is an ``nn.Linear`` (every row of features is a patch).
    """
    return take_rows(unfolded(x, geo, first_kernel, linear=linear))


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


def _sub_patch(geo: ConvGeometry, first_kernel: tuple[int, int]) -> tuple[slice, slice] | None:
    """The kernel rows and columns of the original kernel's patch that make up the first layer's patch
    of ``first_kernel`` at every position, when the two layers' positions are the same (None otherwise).

    A dimension the first layer holds has the conv's own stride, padding and dilation; in a dimension
    it leaves to the second layer, its kernel is 1 at stride 1 over every input position, which are
    the centres of the original kernel's patches when that dimension's kernel is odd, its stride 1 and
    its padding keeps the size (the centre is never in the padding).
    """
    for d in range(2):
        k = geo.kernel[d]
        if first_kernel[d] == 1 and k > 1 and (geo.stride[d] != 1 or k % 2 == 0 or geo.padding[d] != geo.dilation[d] * (k - 1) // 2):
            return None
    kh, kw = geo.kernel
    rows = slice(None) if first_kernel[0] == kh else slice(kh // 2, kh // 2 + 1)
    cols = slice(None) if first_kernel[1] == kw else slice(kw // 2, kw // 2 + 1)
    return rows, cols


_WHOLE = (slice(None), slice(None))


def _offset_major(view: Tensor) -> Tensor:
    """A conv's patch view (images, out_h, out_w, I, a_h, a_w) with each patch's columns in (a_h, a_w, I)
    order instead of unfold's (I, a_h, a_w): in the channels-last padded input the channels of one
    kernel offset lie side by side, and patches copied out in that order take about 0.6 of the time at
    28x28 and 14x14, a tenth or less at 7x7 and 4x4 (``benchmarks/diagnostics/calibration_layout.py``);
    a sum is put in unfold's order once, when it is read."""
    return view.permute(0, 1, 2, 4, 5, 3)


def _columns_in_unfold_order(s: Tensor, channels: int, kernel: tuple[int, int], part: tuple[slice, slice] = _WHOLE) -> Tensor:
    """Sums (..., a_h * a_w * I) over offset-major patches (:func:`_offset_major`) with their last axis
    in unfold's order, restricted to the kernel rows and columns ``part`` of a sub-patch. Entries are
    moved, none recomputed."""
    lead = s.shape[:-1]
    v = s.reshape(*lead, *kernel, channels)[..., part[0], part[1], :]
    return v.movedim(-1, -3).reshape(*lead, -1)


def _blocks_in_unfold_order(s: Tensor, channels: int, kernel: tuple[int, int], part: tuple[slice, slice] = _WHOLE,
                            groups: int = 1) -> Tensor:
    """The diagonal blocks (groups, n, n) of a sum of products of offset-major patches, one per group of
    ``channels / groups`` input channels, each with both axes in unfold's order (restricted to ``part``,
    as :func:`_columns_in_unfold_order`): only the blocks are copied out."""
    v = s.reshape(*kernel, channels, *kernel, channels)[part[0], part[1], :, part[0], part[1], :]
    fh, fw, c = v.shape[0], v.shape[1], channels // groups
    v = v.unflatten(5, (groups, c)).unflatten(2, (groups, c)).diagonal(dim1=2, dim2=6)  # (fh, fw, c, fh, fw, c, groups)
    return v.permute(6, 2, 0, 1, 5, 3, 4).reshape(groups, c * fh * fw, c * fh * fw)


class _Moments:
    """Sums of the products p^T p of one stream's patches for a set of keys, plus means of the full patches."""

    def __init__(self, geo: ConvGeometry, keys: Iterable[Key], device: torch.device | str | None, sampling: Sampling | None) -> None:
        self.geo = geo
        self.linear = False
        self.device = device
        self.sampling = sampling
        self.streamed: dict[tuple[int, int], int] = {}  # patches streamed past per unfolding, kept or not
        wanted = {(tuple(fk), int(g)) for fk, g in keys}
        for fk, g in wanted:
            if any(a not in (1, k) for a, k in zip(fk, geo.kernel)):
                raise SpecError(f"first_kernel {fk} must be, per dimension, 1 or the kernel size {geo.kernel}")
            if geo.in_channels % g:
                raise SpecError(f"first-layer groups {g} do not divide the {geo.in_channels} input channels")
        # a group-1 moment holds every grouped one of the same unfolding: store only it
        stored = {k for k in wanted if k[1] == 1 or (k[0], 1) not in wanted}
        # where a first layer's patches are sub-patches of the original kernel's at the same positions,
        # its moment is a block of the full one: taken from it when that one is kept anyway
        self.within_full: dict[tuple[int, int], tuple[slice, slice]] = {}
        if (geo.kernel, 1) in stored:
            for fk in {k[0] for k in stored} - {geo.kernel}:
                part = _sub_patch(geo, fk)
                if part is not None:
                    self.within_full[fk] = part
        self.stored = sorted(k for k in stored if k[0] not in self.within_full)
        # unfoldings whose patches are summed in offset-major column order: those of more than one
        # kernel offset with no first-layer groups among their sums (a group's columns are a block in
        # unfold's order only)
        unfoldings = {k[0] for k in self.stored} | {geo.kernel}
        self.offset_major = {fk for fk in unfoldings if prod(fk) > 1 and all(g == 1 for f, g in self.stored if f == fk)}
        self.sums: dict[Key, Tensor] = {}
        self.count = 0  # patches of the original kernel (output positions) seen
        self.counts: dict[tuple[int, int], int] = {}  # patches seen per unfolding (first layer's positions)

    def _take(self, x: Tensor, fk: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """The patches of ``x`` under unfolding ``fk`` that the sampling keeps (every one without a
        sampling), in their working precision, and the (start, step) of the rows taken."""
        view = unfolded(x, self.geo, fk, linear=self.linear)
        if fk in self.offset_major:
            view = _offset_major(view)
        start, step = 0, 1
        if self.sampling is not None:
            positions = _positions(view)
            step = self.sampling.step(positions, prod(view.shape[3:]))
            before = self.streamed.get(fk, 0)
            start = -before % step
            self.streamed[fk] = before + view.shape[0] * positions
        return working_precision(take_rows(view, start, step)), (start, step)

    def _zeros(self, key: Key, like: Tensor) -> Tensor:
        fk, g = key
        n = _columns(self.geo, fk) // g
        return torch.zeros(g, n, n, dtype=torch.float64, device=self.device or like.device)

    def _add(self, key: Key, p: Tensor) -> None:
        """Add ``p^T p`` of each first-layer group's columns to ``key``'s sums."""
        g = key[1]
        if key not in self.sums:
            self.sums[key] = self._zeros(key, p)
        acc = self.sums[key]
        p = p.to(acc.device)
        n = p.shape[1] // g
        for j in range(g):
            gram(p[:, j * n : (j + 1) * n], out=acc[j])

    def _moment(self, store: dict[Key, Tensor], first_kernel: tuple[int, int], groups: int) -> Tensor:
        if self.count == 0:
            raise SpecError("no calibration inputs were seen: call update() with at least one batch first")
        fk = tuple(first_kernel)
        if (fk, groups) in store and fk not in self.offset_major:
            return store[(fk, groups)] / self.counts[fk]
        if (fk, 1) in store:
            full, kernel, part, count = store[(fk, 1)][0], fk, _WHOLE, self.counts[fk]
        elif fk in self.within_full:
            kernel = self.geo.kernel
            full, part, count = store[(kernel, 1)][0], self.within_full[fk], self.counts[kernel]
        else:
            raise SpecError(f"the moment of first_kernel {fk} with {groups} groups was not requested; ask for it when creating the statistics")
        if kernel in self.offset_major:
            return _blocks_in_unfold_order(full, self.geo.in_channels, kernel, part, groups) / count  # may be a view of the sums
        assert part is _WHOLE, "a sub-patch is read from the full moment, which is offset-major"
        n = full.shape[0] // groups
        return torch.stack([full[j * n : (j + 1) * n, j * n : (j + 1) * n] for j in range(groups)]) / count

    def _in_unfold_columns(self, s: Tensor) -> Tensor:
        """Sums over the original kernel's patches, their last axis in unfold's column order."""
        kernel = self.geo.kernel
        return _columns_in_unfold_order(s, self.geo.in_channels, kernel) if kernel in self.offset_major else s

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
        sampling: which patches are summed (default: every one).
    """

    def __init__(
        self,
        layer: nn.Module,
        families: Iterable[tuple[tuple[int, int], tuple[int, int]]] = (),
        *,
        full: bool = False,
        device: torch.device | str | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        geo = layer_geometry(layer)
        super().__init__(geo, _keys(geo, families, full), device, sampling)
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
                p, _ = self._take(chunk, fk)
                self.counts[fk] = self.counts.get(fk, 0) + p.shape[0]
                if fk == self.geo.kernel:
                    dev = self.device or p.device
                    self.mean_sum = self.mean_sum.to(dev) + column_sums(p).to(dev)
                    count = p.shape[0]
                for key in self.stored:
                    if key[0] == fk:
                        self._add(key, p)
            self.count += count

    def moment(self, first_kernel: tuple[int, int], groups: int = 1) -> Tensor:
        """E[p p^T] per first-layer group: (groups, n, n), n = I / groups * a_h * a_w."""
        return self._moment(self.sums, first_kernel, groups)

    def full_moment(self) -> Tensor:
        """E[p p^T] of the original kernel's patches: (I * kh * kw, I * kh * kw)."""
        return self.moment(self.geo.kernel, 1)[0]

    def full_mean(self) -> Tensor:
        """E[p] of the original kernel's patches: the layer's output mean is ``W.reshape(O, -1) @ E[p] + b``."""
        return self._in_unfold_columns(self.mean_sum) / max(self.count, 1)

    def _mean_bytes(self) -> int:
        return _columns(self.geo, self.geo.kernel) * 8

    def hook(self, layer: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Feed every input ``layer`` sees from now on (remove the handle when done)."""
        return layer.register_forward_pre_hook(lambda _module, args: self.update(args[0]))


class CrossMoments(_Moments):
    """Streamed statistics of one layer under two input streams: the original model's inputs
    ``x_orig`` and those the already-compressed prefix produces, ``x_comp`` (same images, same order).

    What the asymmetric fit reads: E[p_comp p_comp^T] per key (the compressed stream's patch moments,
    the full kernel's always among them) and E[y p_comp^T], where y = W p_orig is the original
    layer's output (without its bias) on the original inputs, computed here by the layer itself:
    O x (I*kh*kw), a fraction O / (I*kh*kw) of what E[p_orig p_comp^T] would cost, and all that
    W E[p_orig p_comp^T] needs. Plus the means E[y] and E[p_comp] of the full patches.
    """

    def __init__(
        self,
        layer: nn.Module,
        families: Iterable[tuple[tuple[int, int], tuple[int, int]]] = (),
        *,
        device: torch.device | str | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        geo = layer_geometry(layer)
        super().__init__(geo, _keys(geo, families, True), device, sampling)
        self.layer = layer
        self.linear = isinstance(layer, nn.Linear)
        n = _columns(geo, geo.kernel)
        self.output_sum = torch.zeros(geo.out_channels, n, dtype=torch.float64, device=device)
        self.mean_sums = [torch.zeros(geo.out_channels, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.float64, device=device)]

    def _rows(self, y: Tensor, start: int, step: int) -> Tensor:
        """The layer's output less its bias at the patches' rows ``start, start + step, ...``: (patches, O)."""
        y = _per_image(y) if self.linear else y.permute(0, 2, 3, 1)
        y = take_rows(y, start, step)
        return y - self.layer.bias.detach() if self.layer.bias is not None else y

    @torch.no_grad()
    def update(self, x_orig: Tensor, x_comp: Tensor, y_orig: Tensor | None = None) -> None:
        """Add a batch of the layer's inputs under both streams; ``y_orig``: the layer's output on
        ``x_orig``, where the caller has it (computed here otherwise)."""
        if x_orig.shape != x_comp.shape:
            raise SpecError(f"the two input streams differ in shape: {tuple(x_orig.shape)} vs {tuple(x_comp.shape)}")
        y_orig = (self.layer(x_orig) if y_orig is None else y_orig).detach()
        unfoldings = sorted({k[0] for k in self.stored})
        width = max(_columns(self.geo, fk) for fk in unfoldings)
        chunks = list(_chunks(x_comp.detach(), width, self.linear))
        for yo, xc in zip(y_orig.split([len(c) for c in chunks]), chunks):
            for fk in unfoldings:
                pc, taken = self._take(xc, fk)
                self.counts[fk] = self.counts.get(fk, 0) + pc.shape[0]
                if fk == self.geo.kernel:
                    y = working_precision(self._rows(yo, *taken)).to(pc.dtype)
                    dev = self.device or pc.device
                    self.output_sum = self.output_sum.to(dev) + gram(y, pc).to(dev)
                    self.mean_sums = [m.to(dev) + column_sums(t).to(dev) for m, t in zip(self.mean_sums, (y, pc))]
                    self.count += pc.shape[0]
                for key in self.stored:
                    if key[0] == fk:
                        self._add(key, pc)

    def comp(self, first_kernel: tuple[int, int], groups: int = 1) -> Tensor:
        """E[p_comp p_comp^T] per first-layer group: (groups, n, n)."""
        return self._moment(self.sums, first_kernel, groups)

    def output_cross(self) -> Tensor:
        """E[y p_comp^T] over the full patches, y the original layer's output without bias: (O, I * kh * kw)."""
        if self.count == 0:
            raise SpecError("no calibration inputs were seen: call update() with at least one batch first")
        return self._in_unfold_columns(self.output_sum) / self.count

    def full_means(self) -> tuple[Tensor, Tensor]:
        """(E[y], E[p_comp]): the original layer's output mean without bias, the compressed stream's full patch mean."""
        mean_y, mean_comp = self.mean_sums
        return mean_y / max(self.count, 1), self._in_unfold_columns(mean_comp) / max(self.count, 1)

    def _mean_bytes(self) -> int:
        return (self.geo.out_channels + 1) * (_columns(self.geo, self.geo.kernel) + 1) * 8


def needed_families(specs: Iterable[LowRankSpec]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The distinct families of ``specs`` (what a :class:`PatchMoments` must be asked for)."""
    return sorted({s.family() for s in specs})


def moments_for(layer: nn.Module, specs: Iterable[LowRankSpec], derivation: str, **kw: Any) -> PatchMoments:
    """An empty :class:`PatchMoments` holding exactly what ``derive(layer, specs, derivation)`` reads."""
    specs = list(specs)
    if derivation == "weight":
        return PatchMoments(layer, (), **kw)
    return PatchMoments(layer, needed_families(specs), full=derivation == "refit", **kw)
