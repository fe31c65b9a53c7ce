"""The linear algebra of the LR-space: unfold a conv weight into per-group matrices, SVD, fold back.

A weight of shape (O, I, kh, kw) is sliced into ``g = max(groups)`` groups (along I when the first
layer is grouped, along O when the second is). Each slice becomes a matrix whose rows are (output
channel, kernel dims held by the second layer) and whose columns are (input channel, kernel dims held
by the first layer). A kernel dimension of size 1 counts as held by the first layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from svdnas.lowrank.spec import LowRankSpec

Family = tuple[tuple[int, int], tuple[int, int]]


class SVDFactors(NamedTuple):
    """Per-group SVD of a weight unfolded for one family: ``mats[j] = u[j] @ diag(s[j]) @ vh[j]``."""

    u: Tensor  # (g, rows, K)
    s: Tensor  # (g, K)
    vh: Tensor  # (g, K, cols)


def _layout(kernel: tuple[int, int], first_kernel: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Axes (of the grouped 5-d weight g, o, i, h, w) of the second and the first layer's kernel dims."""
    first = [3 + d for d in range(2) if first_kernel[d] == kernel[d]]
    second = [3 + d for d in range(2) if first_kernel[d] != kernel[d]]
    return second, first


def _grouped(weight: Tensor, groups: tuple[int, int]) -> Tensor:
    o, i, kh, kw = weight.shape
    g1, g2 = groups
    if g1 > 1:
        return weight.reshape(o, g1, i // g1, kh, kw).transpose(0, 1)
    return weight.reshape(g2, o // g2, i, kh, kw)


def _ungrouped(grouped: Tensor, groups: tuple[int, int]) -> Tensor:
    g, oj, ij, kh, kw = grouped.shape
    if groups[0] > 1:
        return grouped.transpose(0, 1).reshape(oj, g * ij, kh, kw)
    return grouped.reshape(g * oj, ij, kh, kw)


def unfold(weight: Tensor, first_kernel: tuple[int, int], groups: tuple[int, int]) -> Tensor:
    """Per-group matrices (g, rows, cols) of a conv weight (O, I, kh, kw) for one family."""
    kernel = (weight.shape[2], weight.shape[3])
    second, first = _layout(kernel, first_kernel)
    w = _grouped(weight, groups).permute([0, 1, *second, 2, *first])
    g, oj = w.shape[0], w.shape[1]
    return w.reshape(g, oj * _prod(w.shape[2 : 2 + len(second)]), -1)


def fold(mats: Tensor, shape: torch.Size | tuple[int, ...], first_kernel: tuple[int, int], groups: tuple[int, int]) -> Tensor:
    """Inverse of :func:`unfold`: per-group matrices back to a conv weight of ``shape``."""
    o, i, kh, kw = shape
    g = max(groups)
    oj, ij = (o, i // g) if groups[0] > 1 else (o // g, i)
    second, first = _layout((kh, kw), first_kernel)
    sizes = {3: kh, 4: kw}
    perm = [0, 1, *second, 2, *first]
    w = mats.reshape(g, oj, *(sizes[a] for a in second), ij, *(sizes[a] for a in first))
    inverse = [perm.index(a) for a in range(5)]
    return _ungrouped(w.permute(inverse), groups)


def thin_svd(mats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a batch of float64 matrices (g, m, n) through the eigendecomposition of the
    smaller Gram matrix: several times faster than LAPACK's SVD on the wide, square-ish matrices
    of conv weights (and exact at full rank: u diag(s) vh = u u^T A = A for the full orthonormal u).

    Singular values are accurate to about eps * s_max^2 / s: far below float32's resolution for
    what a weight's reconstruction needs. Directions whose singular value is zero to working
    precision get zero rows (their contribution is zero either way).
    """
    wide = mats.shape[-2] <= mats.shape[-1]
    a = mats if wide else mats.transpose(-2, -1)
    evals, u = torch.linalg.eigh(a @ a.transpose(-2, -1))
    evals, u = evals.flip(-1), u.flip(-1)  # descending
    s = evals.clamp_min(0).sqrt()
    tol = s[..., :1] * max(a.shape[-2:]) * torch.finfo(a.dtype).eps
    live = s > tol
    vh = (u.transpose(-2, -1) @ a) / torch.where(live, s, torch.ones_like(s))[..., None]
    vh = vh * live[..., None]
    if wide:
        return u, s, vh
    return vh.transpose(-2, -1), s, u.transpose(-2, -1)


def svd(weight: Tensor, first_kernel: tuple[int, int], groups: tuple[int, int]) -> SVDFactors:
    """SVD of every group's matrix, computed in float64 and returned in the weight's dtype."""
    mats = unfold(weight.detach(), first_kernel, groups).double()
    u, s, vh = thin_svd(mats)
    return SVDFactors(u.to(weight.dtype), s.to(weight.dtype), vh.to(weight.dtype))


def factor_weights(
    factors: SVDFactors, spec: LowRankSpec, kernel: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Weights of the two convs of a branch from the top ``spec.rank`` singular triplets.

    Returns:
        (first, second): first is (g*r, I/g1, a_h, a_w), second is (O, g*r/g2, b_h, b_w);
        sqrt of the singular values is absorbed on both sides.
    """
    r = spec.rank
    g = factors.u.shape[0]
    root = factors.s[:, :r].sqrt()
    a = spec.first_kernel
    b = (kernel[0] // a[0], kernel[1] // a[1])
    first = (factors.vh[:, :r] * root[:, :, None]).reshape(g * r, -1, a[0], a[1])
    u = factors.u[:, :, :r] * root[:, None, :]  # (g, Oj*b_h*b_w, r)
    oj = u.shape[1] // (b[0] * b[1])
    second = u.reshape(g, oj, b[0], b[1], r).permute(0, 1, 4, 2, 3)  # (g, Oj, r, b_h, b_w)
    if spec.groups[1] > 1:
        second = second.reshape(g * oj, r, b[0], b[1])
    else:
        second = second.transpose(0, 1).reshape(oj, g * r, b[0], b[1])
    return first.contiguous(), second.contiguous()


def reconstruct(factors: SVDFactors, rank: int, shape: torch.Size | tuple[int, ...], family: Family) -> Tensor:
    """The dense weight a branch of ``rank`` stands for."""
    u, s, vh = factors
    mats = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]
    return fold(mats, shape, *family)


def _prod(xs: torch.Size | tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def branches_weight(weight: Tensor, specs) -> Tensor:
    """Dense weight of residual branches ``specs`` of ``weight``: each approximates what the ones before left."""
    out = torch.zeros_like(weight)
    for spec in specs:
        f = svd(weight - out, spec.first_kernel, spec.groups)
        out = out + reconstruct(f, spec.rank, weight.shape, spec.family())
    return out
