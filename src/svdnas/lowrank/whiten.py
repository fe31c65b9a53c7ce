"""Output-aware derivation: a branch's two factors fitted to the layer's output on calibration inputs.

A family unfolds a group of the weight into M (rows x cols); the first layer applies A (r x cols) to
the input patch p, the second B (rows x r). With C = E[p p^T] (+ damping) = L L^T:

- whitened: SVD of M L = U S V^T, B = U_r S_r, A = V_r^T L^-1, minimising E||(M - BA) p||^2 under the
  pooled patch moment; the error of rank r is the sum of the dropped S^2. Exact (the layer's true
  output error) when the second layer is 1x1 and the first is not grouped.
- refit: alternating least squares on the two factors under the full patch moment of the original
  kernel (the true output error whatever the split), started from the whitened factors.
- prefix: the asymmetric fit (Zhang et al., TPAMI 2016): the branch on the compressed model's inputs
  x_comp reproduces the original layer on the original inputs x_orig; with C_cc = E[p_comp p_comp^T]
  = L L^T and y = W p_orig the original layer's output, the least-squares target is
  W* = E[y p_comp^T] C_cc^-1 and E||W p_orig - BA p_comp||^2 = const + ||(W* - BA) L||_F^2, so B A is
  the truncated SVD of W* L, mapped back by L^-1 (exact for the whole kernel in an ungrouped first
  layer; other families whiten by their own pooled moments, then refit on the exact error).

All factors are float64 :class:`~svdnas.lowrank.functional.SVDFactors` (``vh`` already carries
L^-1), so :func:`~svdnas.lowrank.functional.factor_weights` folds any rank of them into the two conv
weights exactly as for the data-free SVD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from svdnas.errors import SpecError
from svdnas.lowrank import functional as F
from svdnas.lowrank.calibration import CrossMoments, PatchMoments
from svdnas.lowrank.decompose import check_layer_specs, decompose, empty_block
from svdnas.lowrank.geometry import conv_weight
from svdnas.lowrank.modules import LowRankBlock
from svdnas.lowrank.spec import LowRankSpec

logger = logging.getLogger(__name__)

DERIVATIONS = ("weight", "whitened", "refit")
_DENSE_SOLVE_MAX = 3000  # unknowns of the first-layer step solved directly; above, preconditioned CG
_CANCELLED = 1e-6  # a refit's error below this fraction of tr(W C W^T) is taken from the difference itself


def _damped(c: Tensor, damping: float) -> Tensor:
    """A batch (b, n, n) of moments symmetrised, plus lambda I with lambda = damping * trace / n (1 for
    an all-zero moment)."""
    n = c.shape[-1]
    c = c + c.transpose(-2, -1)  # a new tensor: the rest is done in place, no n x n temporaries
    c.mul_(0.5)
    trace = c.diagonal(dim1=-2, dim2=-1).sum(-1)
    lam = torch.where(trace > 0, damping * trace / n, torch.ones_like(trace))
    c.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    return c


def _roots(c: Tensor, damping: float) -> tuple[Tensor, Tensor | None]:
    """(L, L^+) per matrix of a batch (b, n, n) of moments, L L^T = :func:`_damped` C.

    L is the Cholesky factor (any L with L L^T = C whitens alike: the truncations of M L and of
    M L Q agree for orthogonal Q), an order of magnitude cheaper than an eigendecomposition, and
    comes with None in place of its inverse (products with L^-1 are triangular solves, see
    :meth:`Whitening.unwhiten`); where the damped moment is too ill-conditioned for it, L = Q sqrt(E)
    from the eigendecomposition, with eigenvalues at rounding level dropped from the pseudo-inverse.
    """
    damped = _damped(c, damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if bool((info == 0).all()) and _finite_factor(chol):
        return chol, None
    return _eigen_roots(damped)


def _finite_factor(chol: Tensor) -> bool:
    """Whether Cholesky factors are finite, read from their diagonals: L_ii = sqrt(C_ii - sum_k<i L_ik^2),
    so a non-finite entry anywhere in row i (or a zero pivot before it) leaves L_ii non-finite."""
    return bool(torch.isfinite(chol.diagonal(dim1=-2, dim2=-1)).all())


def _eigen_roots(damped: Tensor) -> tuple[Tensor, Tensor]:
    """(Q sqrt(E), pseudo-inverse) of a batch of damped moments, eigenvalues at rounding level dropped."""
    n = damped.shape[-1]
    e, q = torch.linalg.eigh(damped)
    live = e > e.amax(-1, keepdim=True) * n * torch.finfo(damped.dtype).eps
    root = e.clamp_min(0).sqrt()
    inv = torch.where(live, 1 / torch.where(live, root, torch.ones_like(root)), torch.zeros_like(root))
    return q * root[:, None, :], inv[:, :, None] * q.transpose(-2, -1)


def _per_group(moment: Tensor, mats: Tensor) -> Tensor:
    """A (g1, n, n) moment laid out for the (g, rows, n) matrices of a family (broadcast over g2 groups)."""
    c = moment.to(device=mats.device, dtype=torch.float64)
    if c.dim() == 2:
        c = c[None]
    if c.shape[-1] != mats.shape[-1] or c.shape[0] not in (1, mats.shape[0]):
        raise SpecError(
            f"a moment of shape {tuple(c.shape)} does not fit this family's {mats.shape[0]} matrices of "
            f"{mats.shape[-1]} columns: take it from the same first_kernel and first-layer groups"
        )
    return c.expand(mats.shape[0], -1, -1)


class Whitening:
    """The damped square root L of a (g1, n, n) moment, shared by every family (and every rank) that
    whitens by that moment: a Cholesky factor, or the eigendecomposition's root with its
    pseudo-inverse where the moment is too ill-conditioned for one."""

    def __init__(self, moment: Tensor, damping: float = 1e-6) -> None:
        c = moment.to(dtype=torch.float64)
        self.root, self._pinv = _roots(c if c.dim() == 3 else c[None], damping)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.root, self._pinv) if t is not None)

    def root_for(self, mats: Tensor) -> Tensor:
        """L laid out for a family's (g, rows, n) matrices."""
        return _per_group(self.root, mats)

    def unwhiten(self, x: Tensor, mats: Tensor) -> Tensor | None:
        """``x`` L^-1 (L^+ for an eigendecomposition's root) for rows ``x`` (g, k, n) of a family's
        whitened matrices: a triangular solve with a Cholesky factor, k n^2 products where forming
        L^-1 would take n^3 / 3 more; None where that is not finite (the factor too ill-conditioned
        after all: :meth:`use_eigen_roots`, then whiten again)."""
        if self._pinv is not None:
            return x @ _per_group(self._pinv, mats)
        out = torch.linalg.solve_triangular(self.root_for(mats), x, upper=False, left=False)
        return out if bool(torch.isfinite(out.sum())) else None  # a sum is finite only if every entry is (or it overflowed)

    def use_eigen_roots(self) -> None:
        """Replace a Cholesky factor by the eigendecomposition's root and pseudo-inverse of the same moment."""
        if self._pinv is None:
            self.root, self._pinv = _eigen_roots(self.root @ self.root.transpose(-2, -1))


def whitened_svd(weight: Tensor, family: F.Family, moment: Tensor | Whitening, *, damping: float = 1e-6) -> F.SVDFactors:
    """Whitened SVD of every group of ``weight`` for ``family``; any rank is a prefix of it.

    Args:
        weight: (O, I, kh, kw).
        family: (first_kernel, groups).
        moment: E[p p^T] of the first layer's patches per first-layer group, (g1, n, n), as
            :meth:`PatchMoments.moment(first_kernel, groups[0]) <PatchMoments.moment>` gives it, or
            its :class:`Whitening` (then ``damping`` is the one it was made with; where its Cholesky
            factor is too ill-conditioned to solve with, it is switched in place to the eigen root,
            for every family that shares it: any root whitens alike).
        damping: lambda = damping * trace(C) / n added to C's diagonal.
    """
    mats = F.unfold(weight.detach().double(), *family)
    whitening = moment if isinstance(moment, Whitening) else Whitening(moment.to(mats.device), damping)
    u, s, vh = F.thin_svd(mats @ whitening.root_for(mats))
    first = whitening.unwhiten(vh, mats)
    if first is None:  # the same moment's eigendecomposition root instead, and the SVD taken with it
        whitening.use_eigen_roots()
        u, s, vh = F.thin_svd(mats @ whitening.root_for(mats))
        first = whitening.unwhiten(vh, mats)
    return F.SVDFactors(u, s, first)


def whitened_matrices(weight: Tensor, family: F.Family, whitening: Whitening) -> Tensor:
    """M L: the weight unfolded for ``family`` (g, rows, n), each group times its moment's root."""
    mats = F.unfold(weight.detach().double(), *family)
    return mats @ whitening.root_for(mats)


def singular_values(x: Tensor) -> Tensor:
    """The singular values (g, k), descending, of a batch of matrices, from the eigenvalues of the
    smaller Gram matrix of each."""
    gram = x @ x.transpose(-2, -1) if x.shape[-2] <= x.shape[-1] else x.transpose(-2, -1) @ x
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def whitened_spectrum(weight: Tensor, family: F.Family, whitening: Whitening) -> Tensor:
    """The singular values (g, k), descending, of :func:`whitened_svd`'s factors without the factors:
    the eigenvalues of the smaller Gram matrix of M L (what :func:`rank_errors` reads)."""
    return singular_values(whitened_matrices(weight, family, whitening))


def rank_errors(factors: F.SVDFactors | Tensor) -> Tensor:
    """Squared output error (per patch, summed over groups) of every rank 0..K: ``out[r]`` is the
    sum of the dropped squared singular values (of the factors, or (g, k) singular values given
    alone). For whitened factors it is E||(M - BA) p||^2 under the damped pooled moment; for prefix
    factors, the error less a constant."""
    s2 = (factors if isinstance(factors, Tensor) else factors.s).double() ** 2
    total = s2.sum(-1, keepdim=True)
    tails = torch.cat([total, total - s2.cumsum(-1)], -1).clamp_min(0)
    return tails.sum(0)


# ---- a branch as the dense weight it stands for, and its error under the full patch moment ----


def _slots(kernel: tuple[int, int], first_kernel: tuple[int, int], in_channels: int) -> Tensor:
    """(S, I * a_h * a_w) columns of the full patch (I, kh, kw) that the first layer's patch at each of
    the second layer's S = b_h * b_w kernel offsets covers."""
    (kh, kw), (fh, fw) = kernel, first_kernel
    i = torch.arange(in_channels).view(1, 1, -1, 1, 1)
    uh, uw = torch.arange(fh).view(1, 1, 1, -1, 1), torch.arange(fw).view(1, 1, 1, 1, -1)
    sh, sw = torch.arange(kh // fh).view(-1, 1, 1, 1, 1), torch.arange(kw // fw).view(1, -1, 1, 1, 1)
    idx = i * kh * kw + (uh + sh) * kw + (uw + sw)
    return idx.reshape((kh // fh) * (kw // fw), -1)


def _to_big(w1: Tensor, w2: Tensor, spec: LowRankSpec, out_channels: int, in_channels: int) -> tuple[Tensor, Tensor]:
    """Conv weights -> A (R, I*a) with grouped blocks in place and B (O, S, R)."""
    (g1, g2), r, big_r = spec.groups, spec.rank, spec.width
    w1, w2 = w1.double(), w2.double()
    cols = w1[0].numel() * g1
    a = w1.reshape(big_r, -1)
    if g1 > 1:
        a, nj = torch.zeros(big_r, cols, dtype=w1.dtype, device=w1.device), cols // g1
        for j in range(g1):
            a[j * r : (j + 1) * r, j * nj : (j + 1) * nj] = w1[j * r : (j + 1) * r].reshape(r, nj)
    b = w2.reshape(out_channels, big_r // g2, -1).transpose(1, 2)
    if g2 > 1:
        part, oj = b, out_channels // g2
        b = torch.zeros(out_channels, part.shape[1], big_r, dtype=w2.dtype, device=w2.device)
        for j in range(g2):
            b[j * oj : (j + 1) * oj, :, j * r : (j + 1) * r] = part[j * oj : (j + 1) * oj]
    return a, b


def _from_big(a: Tensor, b: Tensor, spec: LowRankSpec, w1_shape, w2_shape) -> tuple[Tensor, Tensor]:
    (g1, g2), r = spec.groups, spec.rank
    if g1 > 1:
        nj = a.shape[1] // g1
        a = torch.cat([a[j * r : (j + 1) * r, j * nj : (j + 1) * nj] for j in range(g1)])
    if g2 > 1:
        oj = b.shape[0] // g2
        b = torch.cat([b[j * oj : (j + 1) * oj, :, j * r : (j + 1) * r] for j in range(g2)])
    return a.reshape(w1_shape), b.transpose(1, 2).reshape(w2_shape)


def _masks(spec: LowRankSpec, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Where A (R, I*a) and B (O, R) may be non-zero."""
    (g1, g2), r = spec.groups, spec.rank
    ma = torch.ones_like(a, dtype=torch.bool)
    mb = torch.ones(b.shape[0], b.shape[2], dtype=torch.bool, device=b.device)
    if g1 > 1:
        ma = torch.block_diag(*[torch.ones(r, a.shape[1] // g1, device=a.device)] * g1).bool()
    if g2 > 1:
        mb = torch.block_diag(*[torch.ones(b.shape[0] // g2, r, device=b.device)] * g2).bool()
    return ma, mb


def branch_weight(w1: Tensor, w2: Tensor, spec: LowRankSpec, shape: Sequence[int]) -> Tensor:
    """The dense float64 weight (O, I, kh, kw) of a branch whose two conv weights are ``w1``, ``w2``."""
    o, i, kh, kw = shape
    a, b = _to_big(w1, w2, spec, o, i)
    idx = _slots((kh, kw), spec.first_kernel, i).to(a.device)
    dense = torch.zeros(o, i * kh * kw, dtype=torch.float64, device=a.device)
    dense[:, idx.flatten()] = torch.einsum("osk,kc->osc", b, a).reshape(o, -1)
    return dense.reshape(o, i, kh, kw)


def output_error(weight: Tensor, approx: Tensor, full_moment: Tensor) -> float:
    """E||(W - W_hat) p||^2 per patch over the original kernel's patch moment: tr(D C D^T) with
    D = (W - W_hat) reshaped to (O, I*kh*kw). ``approx`` is a dense weight (see :func:`branch_weight`)."""
    d = (weight.detach().double() - approx.detach().double().to(weight.device)).reshape(weight.shape[0], -1)
    c = full_moment.double().to(d.device)
    return float(((d @ c) * d).sum())


def _psd_solve(h: Tensor, rhs: Tensor) -> Tensor:
    """Solution of h x = rhs (columns of rhs) for a symmetric PSD h: by Cholesky with a jitter at
    rounding level (n * eps * 10 of the largest diagonal entry) where that factorisation exists, else
    the minimum-norm solution from the eigendecomposition, dropping eigenvalues at that level."""
    h = (h + h.T) / 2
    n = h.shape[0]
    jittered = h.clone()
    jittered.diagonal().add_(h.diagonal().amax().clamp_min(0) * n * torch.finfo(h.dtype).eps * 10)
    chol, info = torch.linalg.cholesky_ex(jittered)
    if int(info) == 0 and _finite_factor(chol):
        return torch.cholesky_solve(rhs, chol)
    return _eigen_solve(h, rhs)


def _eigen_solve(h: Tensor, rhs: Tensor) -> Tensor:
    e, q = torch.linalg.eigh(h)
    live = e > e.amax().clamp_min(0) * h.shape[0] * torch.finfo(h.dtype).eps * 10
    inv = torch.where(live, 1 / torch.where(live, e, torch.ones_like(e)), torch.zeros_like(e))
    return q @ (inv[:, None] * (q.T @ rhs))


def refit(
    weight: Tensor,
    spec: LowRankSpec,
    full_moment: Tensor,
    init: tuple[Tensor, Tensor],
    *,
    iters: int = 4,
    cg_iters: int = 5,
) -> tuple[Tensor, Tensor, float]:
    """Alternating least squares on a branch's two factors under the full patch moment.

    Each step minimises tr((W - W_hat) C (W - W_hat)^T) exactly over one factor with the other fixed
    (the second layer's by a direct solve; the first's directly when small, else by conjugate
    gradients preconditioned with a Kronecker approximation of its normal equations). The error
    never rises; the best factors seen are returned.

    Args:
        weight: (O, I, kh, kw) the branch approximates (the residual for a later branch).
        spec: the branch (rank included).
        full_moment: E[p p^T] of the original kernel's patches (I*kh*kw square).
        init: (first, second) conv weights to start from, e.g. the whitened ones.

    Returns:
        (first, second, error) in float64, the conv weights' shapes as ``init``'s.
    """
    o, i, kh, kw = weight.shape
    w1, w2 = init
    a, b = _to_big(w1, w2, spec, o, i)
    dev = a.device
    idx = _slots((kh, kw), spec.first_kernel, i).to(dev).flatten()
    c = full_moment.double().to(dev)[idx][:, idx]
    s_n, n_f, big_r = b.shape[1], a.shape[1], a.shape[0]
    w = weight.detach().double().to(dev).reshape(o, -1)[:, idx]
    wc = w @ c
    mask_a, mask_b = _masks(spec, a, b)
    c4 = c.reshape(s_n, n_f, s_n, n_f)
    dense = int(mask_a.sum()) <= _DENSE_SOLVE_MAX
    first = None if dense else _FirstLayerMoment(c4, spec.groups[0])  # what every CG step shares

    def second_normal(a: Tensor) -> Tensor:
        """H = A_t C A_t^T with A_t = blockdiag(A, ..., A) over the slots: (S R, S R)."""
        return torch.einsum("sctl,ml->sctm", torch.einsum("kc,scte->skte", a, c4), a).reshape(s_n * big_r, s_n * big_r)

    def error(a: Tensor, b: Tensor, h: Tensor) -> float:
        """tr((W - W_hat) C (W - W_hat)^T) as tr(W C W^T) - 2 tr(W_hat (W C)^T) + sum_o b_o^T H b_o
        (``h``: :func:`second_normal` of ``a``): products of the rank's size, no O x n x n one. Where
        that is under ``_CANCELLED`` of tr(W C W^T), its rounding error (about eps times that trace)
        would matter: there the difference's own products are taken instead."""
        w_hat = torch.einsum("osk,kc->osc", b, a).reshape(o, -1)
        flat = b.reshape(o, -1)
        err = float(w_energy - 2 * (w_hat * wc).sum() + ((flat @ h) * flat).sum())
        if err > _CANCELLED * float(w_energy):
            return err
        d = w - w_hat
        return float(((d @ c) * d).sum())

    w_energy = (w * wc).sum()
    h = second_normal(a)
    best = (error(a, b, h), a, b)
    start = best[0]
    for _ in range(iters):
        # second layer: per output row a least-squares problem over its allowed (slot, rank) weights
        # with H (of the current A) and Z = (W C) A_t^T, block by block
        z = torch.einsum("osc,kc->osk", wc.reshape(o, s_n, n_f), a).reshape(o, s_n * big_r)
        b = torch.zeros_like(b)
        for rows in mask_b.unique(dim=0):
            sel_o = (mask_b == rows).all(1)
            sel = torch.cat([rows.nonzero().flatten() + s * big_r for s in range(s_n)])
            sol = _psd_solve(h[sel][:, sel], z[sel_o][:, sel].T).T
            part = torch.zeros(int(sel_o.sum()), s_n * big_r, dtype=b.dtype, device=dev)
            part[:, sel] = sol
            b[sel_o] = part.reshape(-1, s_n, big_r)
        # first layer: the normal equations sum_{s,t} B_s^T B_t A C_ts = sum_s B_s^T (W C)_s on A's support
        rhs = torch.einsum("osk,osc->kc", b, wc.reshape(o, s_n, n_f)) * mask_a
        if dense:
            ki, ci = mask_a.nonzero(as_tuple=True)
            k = _first_normal_matrix(b, c4, spec.groups[0])
            a = torch.zeros_like(a)
            a[ki, ci] = _psd_solve(k, rhs[ki, ci][:, None])[:, 0]
        else:
            a = _cg_first(a * mask_a, b, first, rhs, mask_a, cg_iters)
        h = second_normal(a)  # for the error and the next step's second layer
        err = error(a, b, h)
        if err < best[0]:
            best = (err, a, b)
    logger.debug("refit %s: output error %.4g -> %.4g", spec, start, best[0])
    w1_new, w2_new = _from_big(best[1], best[2], spec, w1.shape, w2.shape)
    return w1_new, w2_new, best[0]


def _first_normal_matrix(b: Tensor, c4: Tensor, g1: int) -> Tensor:
    """The first layer's normal matrix on its support (the rows of ``A``'s non-zeros in row-major
    order, group by group): K[(k,c),(l,d)] = sum_{t,s} (B_t^T B_s)[k,l] C_ts[c,d], a sum of
    Kronecker products taken for every pair of groups (a, b) in one batched product over (t, s)."""
    s_n, n_f = c4.shape[0], c4.shape[1]
    p, nj, r = s_n * s_n, n_f // g1, b.shape[2] // g1  # r: A's rows per first-layer group
    g = torch.einsum("otk,osl->tskl", b, b).reshape(p, g1, r, g1, r)
    cm = c4.permute(0, 2, 1, 3).reshape(p, g1, nj, g1, nj)  # C_ts, (t, s) flattened as g's
    n = g1 * r * nj
    return torch.einsum("pakbl,pacbd->akcbld", g, cm).reshape(n, n)


def _moment_rows(c4: Tensor) -> Tensor:
    """The moment laid out for :func:`_normal_operator`: [c, (s, t, d)] = C[(s, c), (t, d)]."""
    s_n, n_f = c4.shape[0], c4.shape[1]
    return c4.permute(1, 0, 2, 3).reshape(n_f, s_n * s_n * n_f)


def _normal_operator(b: Tensor, c_rows: Tensor) -> Callable[[Tensor], Tensor]:
    """X -> sum_{t,s} G_ts X C_st with G_ts = B_t^T B_s and C_st[c, d] = C[(s, c), (t, d)]: half the
    gradient in A of tr(B A C A^T B^T), by products of the rank's size, not the output channels'.
    ``c_rows`` is :func:`_moment_rows` of the moment; the products are taken in its precision and
    returned in ``x``'s."""
    s_n, big_r, n_f = b.shape[1], b.shape[2], c_rows.shape[0]
    g = torch.einsum("otk,osl->ktsl", b, b).reshape(big_r, s_n * s_n * big_r).to(c_rows.dtype)

    def apply(x: Tensor) -> Tensor:
        xc = (x.to(c_rows.dtype) @ c_rows).reshape(big_r, s_n, s_n, n_f).permute(2, 1, 0, 3).reshape(s_n * s_n * big_r, n_f)
        return (g @ xc).to(x.dtype)  # [(t, s, l), d] above

    return apply


def _regularised_inverse(m: Tensor) -> Tensor:
    """The inverse of a PSD block of the Kronecker preconditioner, lifted off zero (1e-9 of its mean eigenvalue)."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return _psd_solve(m + 1e-9 * m.trace() * eye / m.shape[0] + 1e-300 * eye, eye)


class _FirstLayerMoment:
    """What the first layer's CG steps share across the alternating steps of one refit: the moment
    laid out for the normal operator, in float32 (the operator's products are most of a refit's
    work; a few CG steps solve only approximately anyway, and the refit keeps the best factors by
    their float64 error), and, per first-layer group, the inverse of its mean diagonal block over the
    slots (the moment's side of the Kronecker preconditioner)."""

    def __init__(self, c4: Tensor, g1: int) -> None:
        n_f = c4.shape[1]
        self.rows = _moment_rows(c4).float()
        c_bar = c4.diagonal(dim1=0, dim2=2).mean(-1)
        self.cols = [slice(j * n_f // g1, (j + 1) * n_f // g1) for j in range(g1)] if g1 > 1 else [slice(None)]
        self.inverses = [_regularised_inverse(c_bar[cols, cols]) for cols in self.cols]


def _cg_first(a: Tensor, b: Tensor, first: _FirstLayerMoment, rhs: Tensor, mask: Tensor, iters: int) -> Tensor:
    """Preconditioned CG on the first layer's normal equations, started at ``a`` (the refit keeps the best
    factors by their float64 error, so a step that the float32 operator leaves worse is not kept)."""
    normal = _normal_operator(b, first.rows)

    def apply(x: Tensor) -> Tensor:
        return normal(x) * mask

    g_bar = torch.einsum("osk,osl->kl", b, b)
    r = a.shape[0] // len(first.cols)  # A's rows per first-layer group
    blocks = [(slice(j * r, (j + 1) * r), cols) for j, cols in enumerate(first.cols)] if len(first.cols) > 1 else [(slice(None), slice(None))]
    inverses = [(_regularised_inverse(g_bar[rows, rows]), c_inv) for (rows, _), c_inv in zip(blocks, first.inverses)]

    def precondition(x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for (rows, cols), (gi, ci) in zip(blocks, inverses):
            out[rows, cols] = gi @ x[rows, cols] @ ci
        return out

    x = a.clone()
    res = rhs - apply(x)
    z = precondition(res)
    p, rz = z, (res * z).sum()
    norm = rhs.norm()
    for _ in range(iters):
        tp = apply(p)
        curvature = (p * tp).sum()
        if curvature <= 0 or res.norm() <= 1e-10 * norm:
            break
        alpha = rz / curvature
        x, res = x + alpha * p, res - alpha * tp
        z = precondition(res)
        rz, rz_old = (res * z).sum(), rz
        p = z + (rz / rz_old) * p
    return x


# ---- whole layers ----


def _specs(specs: Sequence[LowRankSpec] | LowRankSpec) -> list[LowRankSpec]:
    return [specs] if isinstance(specs, LowRankSpec) else list(specs)


def bias_shift(weight: Tensor, approx: Tensor, mean_orig: Tensor, mean_comp: Tensor | None = None) -> Tensor:
    """Change of the output mean to add to the bias: W E[p_orig] - W_hat E[p_comp] (full patches).

    Without ``mean_comp`` (no prefix) it is (W - W_hat) E[p]. For a layer with no bias of its own,
    the shift can go to whatever follows (a BatchNorm's running mean, say).
    """
    mean_comp = mean_orig if mean_comp is None else mean_comp
    w = weight.detach().double().reshape(weight.shape[0], -1)
    dev = w.device
    return w @ mean_orig.double().to(dev) - approx.double().to(dev).reshape(w.shape[0], -1) @ mean_comp.double().to(dev)


def _fill(layer: nn.Module, block: LowRankBlock, weights: list[tuple[Tensor, Tensor]], shift: Tensor | None) -> LowRankBlock:
    """Copy the branches' weights in; the bias is the layer's plus ``shift``. A layer without a bias
    gets one on its first branch's second layer when there is a shift to hold (the run directory's
    loader adds it back from the saved weights)."""
    with torch.no_grad():
        for branch, (w1, w2) in zip(block.branches, weights):
            branch.first.weight.copy_(w1.reshape(branch.first.weight.shape))
            branch.second.weight.copy_(w2.reshape(branch.second.weight.shape))
        second = block.branches[0].second
        if layer.bias is not None:
            bias = layer.bias.detach().double() + (0 if shift is None else shift.to(layer.bias.device))
            second.bias.copy_(bias)
        elif shift is not None:
            second.bias = nn.Parameter(shift.to(device=second.weight.device, dtype=second.weight.dtype))
    return block


def _bias_wanted(layer: nn.Module, bias_correction: bool | None) -> bool:
    return layer.bias is not None if bias_correction is None else bias_correction


@torch.no_grad()
def derive(
    layer: nn.Module,
    specs: Sequence[LowRankSpec] | LowRankSpec,
    derivation: str = "weight",
    stats: PatchMoments | None = None,
    *,
    damping: float = 1e-6,
    refit_iters: int = 4,
    bias_correction: bool = False,
    whitening: Callable[[tuple[int, int], int], Whitening] | None = None,
    factors: Callable[[Tensor, F.Family], F.SVDFactors] | None = None,
) -> LowRankBlock:
    """Replace-ready low-rank version of ``layer``, its factors derived as ``derivation`` says.

    Args:
        layer: an ``nn.Conv2d`` (groups=1) or ``nn.Linear``.
        specs: one spec per branch; branch n approximates what the branches before it left.
        derivation: "weight" (exactly :func:`~svdnas.lowrank.decompose.decompose`), "whitened" or
            "refit" (whitened, then :func:`refit` where the second layer holds kernel dims or the
            first is grouped).
        stats: the layer's input statistics (see :func:`~svdnas.lowrank.calibration.moments_for`):
            every family's moment for "whitened", plus the full moment for "refit".
        bias_correction: add :func:`bias_shift` (from ``stats``' full patch mean) to the bias (a
            layer without one gets one).
        whitening: (first_kernel, first-layer groups) -> the :class:`Whitening` of that moment, where
            the caller keeps them (they are computed here otherwise).
        factors: (weight or residual, family) -> its float64 whitened factors, where the caller
            keeps them (:func:`whitened_svd` otherwise).

    Raises:
        SpecError: for an unknown derivation, missing statistics or a spec that does not fit.
    """
    if derivation not in DERIVATIONS:
        raise SpecError(f"derivation must be one of {', '.join(DERIVATIONS)}; got {derivation!r}")
    specs = _specs(specs)
    if derivation == "weight" and not bias_correction:
        return decompose(layer, specs)
    if stats is None:
        raise SpecError(f"the {derivation!r} derivation needs calibration statistics of the layer's inputs")
    _bias_wanted(layer, bias_correction)
    block = empty_block(layer, specs)
    weight = conv_weight(layer).detach()
    kernel = (weight.shape[2], weight.shape[3])
    residual = weight.double().clone()
    weights = []
    for spec in specs:
        fk, groups = spec.family()
        if derivation == "weight":
            svd = F.svd(residual, fk, groups)
        elif factors is not None:
            svd = factors(residual, spec.family())
        else:
            moment = whitening(fk, groups[0]) if whitening is not None else stats.moment(fk, groups[0])
            svd = whitened_svd(residual, spec.family(), moment, damping=damping)
        w1, w2 = F.factor_weights(svd, spec, kernel)
        if derivation == "refit" and (fk != kernel or groups[0] > 1):
            w1, w2, _ = refit(residual, spec, stats.full_moment(), (w1, w2), iters=refit_iters)
        weights.append((w1, w2))
        residual -= branch_weight(w1, w2, spec, weight.shape)
    shift = bias_shift(weight, weight.double() - residual, stats.full_mean()) if bias_correction else None
    return _fill(layer, block, weights, shift)


PREFIX_RIDGE = 1e-3  # the prefix fit's pull towards the original weight, relative to the mean eigenvalue of C


def prefix_target(weight: Tensor, stats: CrossMoments, *, damping: float = 1e-6, ridge: float = PREFIX_RIDGE) -> tuple[Tensor, Tensor]:
    """(W*, C): the dense weight that, applied to the compressed model's full patches, best reproduces
    ``weight`` on the original ones, pulled towards ``weight`` itself where the patches hardly vary:
    W* = (E[y p_comp^T] + mu W) (C_cc + mu I)^-1 with y = W p_orig and mu = ``ridge`` x the mean
    eigenvalue of C_cc, the minimiser of E||W p_orig - W_hat p_comp||^2 + mu ||W_hat - W||^2; and
    C = C_cc + mu I (plus the ``damping``), so that this objective is const + tr((W* - W_hat) C
    (W* - W_hat)^T): the exact refit of W* under C is the exact prefix fit. Without the pull
    (``ridge=0``) a direction the calibration patches barely visit gets whatever weight fits their
    noise, and an input that does visit it can blow the layer's output up (on EfficientNet-B0 at
    28x28, test images with a KL divergence from the original over 100)."""
    kernel = (weight.shape[2], weight.shape[3])
    raw = stats.comp(kernel)
    c = _damped(raw, damping + ridge)[0]
    n = c.shape[-1]
    mu = ridge * float(torch.diagonal(raw[0]).sum()) / n
    rhs = stats.output_cross().to(c.device).T + mu * weight.reshape(weight.shape[0], -1).to(c).T
    target = _psd_solve(c, rhs).T  # C symmetric, positive definite
    return target.reshape(weight.shape), c


@torch.no_grad()
def derive_prefix(
    layer: nn.Module,
    specs: Sequence[LowRankSpec] | LowRankSpec,
    stats: CrossMoments,
    *,
    damping: float = 1e-6,
    bias_correction: bool | None = None,
    refit_iters: int = 0,
    ridge: float = PREFIX_RIDGE,
) -> LowRankBlock:
    """Low-rank version of ``layer`` fitted to run on the compressed model's inputs (asymmetric fit).

    Each branch is the whitened SVD of what is left of :func:`prefix_target`'s W* under the
    compressed stream's patch moment of its family: exact (the least-squares optimum of the output
    error against the original layer on the original inputs) for the whole kernel in the first layer
    and no first-layer groups; other families whiten by their pooled, per-group moments, then, with
    ``refit_iters``, alternating least squares on the exact error (:func:`refit`).

    Args:
        stats: the layer's inputs under both streams, with every family's moments.
        bias_correction: shift the bias by E[W p_orig] - W_hat E[p_comp] (a layer without a bias gets
            one); None: only when the layer has a bias.
        refit_iters: alternating steps of the exact refit for the families the pooled fit approximates.
        ridge: the pull towards the original weight (:func:`prefix_target`); 0: plain least squares.
    """
    specs = _specs(specs)
    check_layer_specs(layer, specs)
    correct = _bias_wanted(layer, bias_correction)
    block = empty_block(layer, specs)
    weight = conv_weight(layer).detach()
    kernel = (weight.shape[2], weight.shape[3])
    target, c = prefix_target(weight, stats, damping=damping, ridge=ridge)
    fitted = torch.zeros_like(target)
    weights = []
    for spec in specs:
        fk, groups = spec.family()
        factors = whitened_svd(target - fitted, spec.family(), stats.comp(fk, groups[0]), damping=damping + ridge)
        w1, w2 = F.factor_weights(factors, spec, kernel)
        if refit_iters > 0 and (fk != kernel or groups[0] > 1):
            w1, w2, _ = refit(target - fitted, spec, c, (w1, w2), iters=refit_iters)
        weights.append((w1, w2))
        fitted += branch_weight(w1, w2, spec, weight.shape).to(fitted.device)
    shift = None
    if correct:
        mean_y, mean_comp = stats.full_means()
        shift = mean_y.to(fitted.device) - fitted.reshape(fitted.shape[0], -1) @ mean_comp.to(fitted.device)
    return _fill(layer, block, weights, shift)


def family_ranks_errors(weight: Tensor, family: F.Family, stats: PatchMoments, *, damping: float = 1e-6) -> Tensor:
    """Whitened error of every rank 0..K of a family, from one decomposition (no convolution)."""
    return rank_errors(whitened_svd(weight, family, stats.moment(family[0], family[1][0]), damping=damping))


__all__ = [
    "DERIVATIONS", "PREFIX_RIDGE", "Whitening", "bias_shift", "branch_weight", "derive", "derive_prefix", "family_ranks_errors",
    "output_error", "prefix_target", "rank_errors", "refit", "singular_values", "whitened_matrices", "whitened_spectrum", "whitened_svd",
]
