import pytest
import torch
from torch import nn
from torch.nn import functional as TF

from svdnas import LowRankSpec, SpecError, decompose
from svdnas.lowrank import functional as F
from svdnas.lowrank import whiten
from svdnas.lowrank.calibration import CrossMoments, PatchMoments, Sampling, moments_for, patches, take_rows, unfolded
from svdnas.lowrank.geometry import conv_weight, layer_geometry
from svdnas.lowrank.space import families
from svdnas.lowrank.spec import family_max_rank
from svdnas.lowrank.whiten import (
    PREFIX_RIDGE,
    bias_shift,
    branch_weight,
    derive,
    derive_prefix,
    output_error,
    prefix_target,
    rank_errors,
    refit,
    whitened_svd,
)

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """LAPACK's eigh on small matrices is far slower multi-threaded on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated(n: int, channels: int, size: tuple[int, int], rank: int = 2, seed: int = 0, dtype=D) -> torch.Tensor:
    """Inputs drawn from a low-rank Gaussian across channels (plus a little isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, *size, generator=g, dtype=D)
    mix = torch.randn(rank, channels, generator=g, dtype=D)
    x = torch.einsum("nrhw,rc->nchw", z, mix) + 0.05 * torch.randn(n, channels, *size, generator=g, dtype=D)
    return x.to(dtype)


def small_conv(mode: str = "zeros", dtype=D, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode=mode).to(dtype)


def fed(layer: nn.Module, x: torch.Tensor, fams=None, full: bool = True) -> PatchMoments:
    stats = PatchMoments(layer, families(layer_geometry(layer)) if fams is None else fams, full=full)
    stats.update(x)
    return stats


def out_err(layer: nn.Module, block: nn.Module, x: torch.Tensor) -> float:
    """Squared output error per output position, summed over channels."""
    with torch.no_grad():
        y = layer(x)
        return float(((block(x) - y) ** 2).sum() / (y.numel() / y.shape[1]))


def max_rank(layer: nn.Module, spec: LowRankSpec) -> int:
    geo = layer_geometry(layer)
    return family_max_rank(spec, geo.out_channels, geo.in_channels, geo.kernel)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_patch_columns_follow_unfold(mode):
    """The first layer a decomposition builds is, for every family, its weight rows applied to our
    patches group by group; and the whole-kernel patches times unfold's matrix are the conv itself."""
    conv = small_conv(mode)
    geo = layer_geometry(conv)
    x = torch.randn(2, 4, 9, 8, dtype=D)
    for fk, groups in families(geo):
        spec = LowRankSpec(fk, groups, 1)
        block = decompose(conv, spec.with_rank(max_rank(conv, spec)))
        first = block.branches[0].first
        y1 = first(x).permute(0, 2, 3, 1).reshape(-1, first.out_channels)
        p = patches(x, geo, fk)
        g1 = groups[0]
        w = first.weight.reshape(g1, first.out_channels // g1, -1)
        n = p.shape[1] // g1
        ours = torch.cat([p[:, j * n : (j + 1) * n] @ w[j].T for j in range(g1)], 1)
        torch.testing.assert_close(ours, y1, rtol=1e-10, atol=1e-10)
    y = (conv(x) - conv.bias[:, None, None]).permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(patches(x, geo) @ F.unfold(conv.weight, (3, 3), (1, 1))[0].T, y)


@pytest.mark.parametrize("channels_last", [False, True])
def test_patches_are_im2col_and_rows_are_taken_from_them(channels_last):
    """The strided view's patches are torch's im2col columns, whatever the input's memory layout,
    and a step's rows are those rows of every patch."""
    conv = nn.Conv2d(3, 5, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1)).double()
    geo = layer_geometry(conv)
    x = torch.randn(3, 3, 11, 9, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    every = TF.unfold(x, (3, 5), dilation=(2, 1), padding=(1, 2), stride=(2, 1)).transpose(1, 2).reshape(-1, 3 * 3 * 5)
    assert torch.equal(patches(x, geo), every)
    view = unfolded(x, geo)
    for start, step in [(0, 1), (0, 4), (3, 7)]:
        assert torch.equal(take_rows(view, start, step), every[start::step])


def test_moments_stream_and_slice():
    conv = small_conv()
    geo = layer_geometry(conv)
    x = correlated(5, 4, (7, 6))
    wanted = [((1, 3), (1, 1)), ((1, 3), (2, 1)), ((3, 1), (4, 1))]
    one, two = PatchMoments(conv, wanted, full=True), PatchMoments(conv, wanted, full=True)
    one.update(x)
    two.update(x[:2])
    two.update(x[2:])
    for (fk, g) in wanted:
        torch.testing.assert_close(one.moment(fk, g[0]), two.moment(fk, g[0]))
        p = patches(x, geo, fk)
        n = p.shape[1] // g[0]
        ref = torch.stack([p[:, j * n : (j + 1) * n].T @ p[:, j * n : (j + 1) * n] for j in range(g[0])]) / p.shape[0]
        torch.testing.assert_close(one.moment(fk, g[0]), ref)
    p = patches(x, geo)
    torch.testing.assert_close(one.full_moment(), p.T @ p / p.shape[0])
    torch.testing.assert_close(one.full_mean(), p.mean(0))
    # (1, 3) is stored once (its 2-group blocks are slices); (3, 1) is a block of the full moment
    # (stride 1 and size-keeping padding in the dim it leaves out), stored not at all
    assert one.nbytes() == sum(t.numel() * 8 for t in one.sums.values()) + one.mean_sum.numel() * 8
    assert sorted(one.sums) == [((1, 3), 1), ((3, 3), 1)]
    with pytest.raises(SpecError, match="not requested"):
        one.moment((1, 1), 1)


def test_nbytes_before_any_input_for_a_large_layer():
    """What a 512-channel 3x3 layer's moments weigh, known before a batch is seen (nothing allocated)."""
    conv = nn.Conv2d(512, 512, 3, padding=1, bias=False, device="meta")
    full = PatchMoments(conv, full=True).nbytes()
    assert full == 4608 * 4608 * 8 + 4608 * 8
    pointwise = PatchMoments(conv, [((1, 1), (8, 1))]).nbytes() - 4608 * 8
    assert pointwise == 8 * 64 * 64 * 8


def test_linear_patches_are_rows():
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 2, 5, dtype=D)
    stats = fed(lin, x)
    rows = x.reshape(-1, 5)
    torch.testing.assert_close(stats.full_moment(), rows.T @ rows / 8)


FAMILIES = families(layer_geometry(small_conv()))


@pytest.mark.parametrize("derivation", whiten.DERIVATIONS)
def test_full_rank_is_exact(derivation):
    conv = small_conv(dtype=torch.float32)
    x = correlated(6, 4, (9, 8), dtype=torch.float32)
    stats = fed(conv, x)
    for fk, groups in FAMILIES:
        spec = LowRankSpec(fk, groups, 1)
        block = derive(conv, spec.with_rank(max_rank(conv, spec)), derivation, stats)
        y = conv(x)
        assert ((block(x) - y).norm() / y.norm()).item() < 1e-5, (fk, groups)


@pytest.mark.parametrize("derivation", whiten.DERIVATIONS)
def test_linear_layer(derivation):
    """A linear layer as a 1x1 conv: full rank exact; truncated, the whitened error is the spectrum's."""
    torch.manual_seed(2)
    lin = nn.Linear(6, 5).double()
    x = correlated(50, 6, (1, 1)).reshape(50, 6)
    stats = fed(lin, x)
    full = derive(lin, LowRankSpec((1, 1), (1, 1), 5), derivation, stats)
    torch.testing.assert_close(full(x), lin(x))
    block = derive(lin, LowRankSpec((1, 1), (1, 1), 2), derivation, stats, damping=1e-12)
    errors = rank_errors(whitened_svd(conv_weight(lin), ((1, 1), (1, 1)), stats.moment((1, 1)), damping=1e-12))
    with torch.no_grad():
        measured = float(((block(x) - lin(x)) ** 2).sum() / 50)
    if derivation == "weight":  # the whitened error is the least of any rank-2 pair
        assert measured > errors[2].item()
    else:
        assert measured == pytest.approx(errors[2].item(), rel=1e-6)


@pytest.mark.parametrize("derivation", whiten.DERIVATIONS)
def test_full_rank_second_branch_is_exact_float64(derivation):
    conv = small_conv()
    x = correlated(6, 4, (9, 8))
    stats = fed(conv, x)
    second = LowRankSpec((1, 3), (1, 1), 1)
    block = derive(conv, [LowRankSpec((3, 1), (2, 1), 1), second.with_rank(max_rank(conv, second))], derivation, stats)
    y = conv(x)
    assert ((block(x) - y).norm() / y.norm()).item() < 1e-10


def test_weight_derivation_is_decompose_byte_for_byte():
    conv = small_conv(dtype=torch.float32)
    lin = nn.Linear(7, 5)
    for layer, specs in (
        (conv, [LowRankSpec((3, 1), (2, 1), 2), LowRankSpec((1, 3), (1, 3), 1)]),
        (lin, [LowRankSpec((1, 1), (1, 1), 3)]),
    ):
        ours, ref = derive(layer, specs, "weight").state_dict(), decompose(layer, specs).state_dict()
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_spectrum_error_is_the_measured_output_error():
    """Whole kernel in the first layer, first layer not grouped: the dropped spectrum is the error."""
    conv = small_conv()
    x = correlated(6, 4, (9, 8))
    stats = fed(conv, x)
    for groups in [(1, 1), (1, 2), (1, 3)]:
        factors = whitened_svd(conv.weight, ((3, 3), groups), stats.moment((3, 3), 1), damping=1e-12)
        errors = rank_errors(factors)
        for r in range(1, factors.s.shape[1] + 1):
            block = derive(conv, LowRankSpec((3, 3), groups, r), "whitened", stats, damping=1e-12)
            measured = out_err(conv, block, x)
            assert errors[r].item() == pytest.approx(measured, rel=1e-6, abs=1e-9 * errors[0].item())
            w1, w2 = block.branches[0].first.weight, block.branches[0].second.weight
            dense = branch_weight(w1, w2, block.specs[0], conv.weight.shape)
            assert output_error(conv.weight, dense, stats.full_moment()) == pytest.approx(measured, rel=1e-8, abs=1e-12)


def _plain_pooled_error(weight, family, moment, rank):
    """Pooled (per-group, block-diagonal) error of the plain SVD's rank-r truncation."""
    weight = weight.detach()
    mats = F.unfold(weight.double(), *family)
    d = mats - F.unfold(F.reconstruct(F.svd(weight.double(), *family), rank, weight.shape, family), *family)
    c = moment.expand(mats.shape[0], -1, -1)
    return float(((d @ c) * d).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_whitened_beats_weight_and_refit_beats_whitened_at_every_rank(seed):
    conv = small_conv(seed=seed)
    x = correlated(6, 4, (9, 8), seed=seed)
    stats = fed(conv, x)
    full_c = stats.full_moment()
    for fk, groups in FAMILIES:
        spec = LowRankSpec(fk, groups, 1)
        moment = stats.moment(fk, groups[0])
        spectrum = rank_errors(whitened_svd(conv.weight, spec.family(), moment, damping=0.0))
        for r in range(1, max_rank(conv, spec)):
            errs = {}
            for derivation in whiten.DERIVATIONS:
                b = derive(conv, spec.with_rank(r), derivation, stats).branches[0]
                dense = branch_weight(b.first.weight, b.second.weight, spec.with_rank(r), conv.weight.shape)
                errs[derivation] = output_error(conv.weight, dense, full_c)
            tol = 1e-9 * output_error(conv.weight, torch.zeros_like(conv.weight), full_c)
            assert errs["refit"] <= errs["whitened"] + tol, (fk, groups, r, errs)
            # under the pooled moment whitening is optimal for every family
            assert spectrum[r] <= _plain_pooled_error(conv.weight, spec.family(), moment, r) + tol
            if fk == (3, 3) and groups[0] == 1:  # where the pooled moment is the true one
                assert errs["whitened"] <= errs["weight"] + tol, (fk, groups, r, errs)


def test_refit_reaches_the_brute_force_optimum():
    """A tiny layer whose second layer holds a kernel dim: ALS against many LBFGS restarts."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 2, (3, 1), padding=(1, 0), bias=False).double()
    x = correlated(8, 2, (6, 5), rank=2, seed=3)
    stats = fed(conv, x, [((1, 1), (1, 1))])
    c = stats.full_moment()
    spec = LowRankSpec((1, 1), (1, 1), 1)
    w1, w2 = F.factor_weights(whitened_svd(conv.weight, spec.family(), stats.moment((1, 1))), spec, (3, 1))
    _, _, als = refit(conv.weight, spec, c, (w1, w2), iters=60)

    def loss(a, b):
        return output_error(conv.weight, branch_weight(a, b, spec, conv.weight.shape), c)

    best = float("inf")
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        a = torch.randn(w1.shape, generator=g, dtype=D).requires_grad_()
        b = torch.randn(w2.shape, generator=g, dtype=D).requires_grad_()
        opt = torch.optim.LBFGS([a, b], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure(a=a, b=b, opt=opt):
            opt.zero_grad()
            d = (conv.weight.detach() - branch_weight(a, b, spec, conv.weight.shape)).reshape(2, -1)
            value = ((d @ c) * d).sum()
            value.backward()
            return value

        opt.step(closure)
        best = min(best, loss(a.detach(), b.detach()))
    assert als == pytest.approx(best, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("rank, grouped", [(1, False), (2, True), (None, False)])
def test_refits_error_is_the_output_error_of_the_factors_it_returns(rank, grouped):
    """The error a refit reports (from the rank-sized products, or from the difference itself where
    the fit is all but exact: at full rank) is E||(W - W_hat) p||^2 of the factors it returns, under
    the moment it was given."""
    conv = small_conv()
    stats = fed(conv, correlated(6, 4, (9, 8)))
    spec = LowRankSpec((3, 1), (2, 1) if grouped else (1, 1), 1)
    spec = spec.with_rank(rank or max_rank(conv, spec))
    init = F.factor_weights(whitened_svd(conv.weight, spec.family(), stats.moment((3, 1), spec.groups[0])), spec, (3, 3))
    w1, w2, err = refit(conv.weight, spec, stats.full_moment(), init, iters=3)
    exact = output_error(conv.weight, branch_weight(w1, w2, spec, conv.weight.shape), stats.full_moment())
    assert err == pytest.approx(exact, rel=1e-9, abs=1e-18)
    if rank is None:
        assert err < 1e-20


def test_conjugate_gradient_step_matches_the_direct_solve(monkeypatch):
    conv = small_conv()
    x = correlated(6, 4, (9, 8))
    stats = fed(conv, x)
    for fk, groups, r in [((1, 3), (1, 1), 3), ((3, 1), (2, 1), 2), ((1, 1), (1, 2), 2)]:
        spec = LowRankSpec(fk, groups, r)
        init = F.factor_weights(whitened_svd(conv.weight, spec.family(), stats.moment(fk, groups[0])), spec, (3, 3))
        direct = refit(conv.weight, spec, stats.full_moment(), init, iters=3)[2]
        monkeypatch.setattr(whiten, "_DENSE_SOLVE_MAX", 0)
        cg = refit(conv.weight, spec, stats.full_moment(), init, iters=3, cg_iters=200)[2]
        monkeypatch.undo()
        assert cg == pytest.approx(direct, rel=1e-6)


def test_first_layer_normal_equations_are_half_the_gradient_of_the_output_error():
    """The refit's first-layer step, assembled (dense solve) or applied (CG) as Kronecker products,
    against autograd on tr(B A C A^T B^T) for every layout: ungrouped, grouped first, grouped second."""
    torch.manual_seed(5)
    s_n, n_f, o = 3, 8, 6
    c = torch.randn(s_n * n_f, 2 * s_n * n_f, dtype=D)
    c = c @ c.T / c.shape[1]
    c4 = c.reshape(s_n, n_f, s_n, n_f)
    for g1, g2, r in [(1, 1, 3), (2, 1, 2), (4, 1, 1), (8, 1, 1), (1, 3, 2)]:
        big_r = g1 * g2 * r
        b = torch.randn(o, s_n, big_r, dtype=D)
        if g2 > 1:  # each group of outputs reads its own r of the first layer's channels
            b = b * torch.block_diag(*[torch.ones(o // g2, r, dtype=D)] * g2)[:, None, :]
        mask = torch.block_diag(*[torch.ones(big_r // g1, n_f // g1, dtype=D)] * g1).bool()
        x = (torch.randn(big_r, n_f, dtype=D) * mask).requires_grad_()
        w_hat = torch.einsum("osk,kc->osc", b, x).reshape(o, -1)
        ((w_hat @ c) * w_hat).sum().backward()
        half_grad = x.grad / 2
        assert torch.allclose(whiten._normal_operator(b, whiten._moment_rows(c4))(x.detach()), half_grad, atol=1e-12)
        ki, ci = mask.nonzero(as_tuple=True)
        k = whiten._first_normal_matrix(b, c4, g1)
        assert torch.allclose(k @ x.detach()[ki, ci], half_grad[ki, ci], atol=1e-12)
        assert torch.allclose(k, k.T, atol=1e-12)


def test_bias_correction_zeroes_the_mean_output_error():
    conv = small_conv()
    x = correlated(6, 4, (9, 8)) + 1.0  # inputs with a mean
    stats = fed(conv, x)
    spec = LowRankSpec((1, 3), (1, 1), 2)
    plain = derive(conv, spec, "whitened", stats)
    corrected = derive(conv, spec, "whitened", stats, bias_correction=True)
    mean_err = (corrected(x) - conv(x)).mean((0, 2, 3))
    assert mean_err.abs().max() < 1e-10 * conv(x).abs().max()
    assert out_err(conv, corrected, x) <= out_err(conv, plain, x)

    # a layer without a bias gets one holding the shift, with the same effect on the output's mean
    bare = nn.Conv2d(4, 6, 3, bias=False).double()
    with torch.no_grad():
        bare.weight.copy_(conv.weight)
    block = derive(bare, spec, "whitened", fed(bare, x), bias_correction=True)
    assert block.branches[0].second.bias is not None
    assert (block(x) - bare(x)).mean((0, 2, 3)).abs().max() < 1e-10 * bare(x).abs().max()
    assert derive(bare, spec, "whitened", fed(bare, x)).branches[0].second.bias is None


def test_prefix_fit_on_perturbed_inputs():
    """The compressed prefix hands the layer distorted inputs; fitting to them beats fitting to the
    originals, and with undistorted inputs the prefix fit is the whitened one."""
    conv = small_conv()
    x = correlated(8, 4, (9, 8))
    g = torch.Generator().manual_seed(5)
    distort = torch.eye(4, dtype=D) + 0.3 * torch.randn(4, 4, generator=g, dtype=D)
    x_comp = torch.einsum("nchw,cd->ndhw", x, distort) + 0.2
    cross = CrossMoments(conv, [((3, 3), (1, 1)), ((3, 3), (1, 2))])
    cross.update(x[:3], x_comp[:3])
    cross.update(x[3:], x_comp[3:])
    for groups in [(1, 1), (1, 2)]:
        spec = LowRankSpec((3, 3), groups, 3)
        prefix = derive_prefix(conv, spec, cross)
        on_orig = derive(conv, spec, "whitened", fed(conv, x))
        on_comp = derive(conv, spec, "whitened", fed(conv, x_comp))
        with torch.no_grad():
            y = conv(x)

        def err(block, y=y):
            with torch.no_grad():
                return float(((block(x_comp) - y) ** 2).mean())

        assert err(prefix) < 0.8 * min(err(on_orig), err(on_comp))
        # the output mean over the calibration set is matched
        assert (prefix(x_comp) - y).mean((0, 2, 3)).abs().max() < 1e-8
    same = CrossMoments(conv, [((3, 3), (1, 1))])
    same.update(x, x)
    spec = LowRankSpec((3, 3), (1, 1), 3)
    a = derive_prefix(conv, spec, same, bias_correction=False, damping=1e-12, ridge=0)
    b = derive(conv, spec, "whitened", fed(conv, x), damping=1e-12)
    wa = branch_weight(a.branches[0].first.weight, a.branches[0].second.weight, spec, conv.weight.shape)
    wb = branch_weight(b.branches[0].first.weight, b.branches[0].second.weight, spec, conv.weight.shape)
    torch.testing.assert_close(wa, wb, rtol=1e-6, atol=1e-8)


def test_the_prefix_targets_pull_towards_the_weight_keeps_unvisited_directions():
    """Inputs that never visit some directions (here 3 of 8 channels are always 0 in calibration):
    plain least squares gives those directions whatever weight (0 here), the pull keeps the original's;
    on the visited ones the two agree, and with the inputs unchanged the pulled target is W itself."""
    lin = nn.Linear(8, 4, bias=False).double()
    torch.manual_seed(2)
    x = torch.randn(300, 8, dtype=D)
    x[:, 5:] = 0
    cross = CrossMoments(lin, [((1, 1), (1, 1))])
    cross.update(x, x)
    w = lin.weight.detach().reshape(4, 8, 1, 1)
    plain, _ = prefix_target(w, cross, damping=1e-12, ridge=0)
    pulled, c = prefix_target(w, cross, damping=1e-12)
    torch.testing.assert_close(pulled, w)  # the inputs are unchanged: nothing to fit but W
    assert plain[:, 5:].abs().max() < 1e-9 < w[:, 5:].abs().max()  # least squares drops the unvisited weights
    torch.testing.assert_close(plain[:, :5], w[:, :5])
    trace = float(torch.diagonal(cross.comp((1, 1))[0]).sum())
    assert float(c[5, 5]) == pytest.approx((1e-12 + PREFIX_RIDGE) * trace / 8)  # the metric holds the pull


def test_prefix_residual_branch_completes_the_fit():
    """Two branches fitted in turn: at full rank the second makes the block the least-squares map."""
    lin = nn.Linear(5, 4).double()
    torch.manual_seed(1)
    x = torch.randn(200, 5, dtype=D)
    x_comp = x @ (torch.eye(5, dtype=D) + 0.2 * torch.randn(5, 5, dtype=D))
    cross = CrossMoments(lin, [((1, 1), (1, 1))])
    cross.update(x, x_comp)
    block = derive_prefix(lin, [LowRankSpec((1, 1), (1, 1), 1), LowRankSpec((1, 1), (1, 1), 4)], cross, damping=1e-12, ridge=0)
    # least squares of the original outputs on [x_comp, 1]
    design = torch.cat([x_comp, torch.ones(200, 1, dtype=D)], 1)
    solution = torch.linalg.lstsq(design, lin(x)).solution
    torch.testing.assert_close(block(x_comp), design @ solution, rtol=1e-6, atol=1e-8)


def test_moments_for_asks_for_what_derive_reads():
    conv = small_conv()
    specs = [LowRankSpec((1, 3), (2, 1), 1), LowRankSpec((3, 3), (1, 2), 1)]
    stats = moments_for(conv, specs, "whitened")
    assert sorted(stats.sums.keys() | set(stats.stored)) == [((1, 3), 2), ((3, 3), 1)]
    stats.update(correlated(2, 4, (7, 7)))
    derive(conv, specs, "whitened", stats)
    first_only = moments_for(conv, specs[:1], "whitened")
    first_only.update(correlated(2, 4, (7, 7)))
    with pytest.raises(SpecError, match="not requested"):
        derive(conv, specs[:1], "refit", first_only)
    refit_stats = moments_for(conv, specs, "refit")
    assert ((3, 3), 1) in refit_stats.stored
    with pytest.raises(SpecError, match="derivation"):
        derive(conv, specs, "magic", stats)


def test_bias_shift_formula():
    w = torch.randn(3, 2, 1, 1, dtype=D)
    approx = torch.randn(3, 2, 1, 1, dtype=D)
    mo, mc = torch.randn(2, dtype=D), torch.randn(2, dtype=D)
    torch.testing.assert_close(bias_shift(w, approx, mo, mc), w[:, :, 0, 0] @ mo - approx[:, :, 0, 0] @ mc)


def test_hook_feeds_the_layer_inputs():
    conv = small_conv()
    model = nn.Sequential(nn.Conv2d(3, 4, 1).double(), conv)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    stats = PatchMoments(conv, [((1, 3), (1, 1))])
    handle = stats.hook(conv)
    with torch.no_grad():
        model(x)
    handle.remove()
    with torch.no_grad():
        model(x)  # no longer fed
    ref = PatchMoments(conv, [((1, 3), (1, 1))])
    ref.update(model[0](x).detach())
    torch.testing.assert_close(stats.moment((1, 3)), ref.moment((1, 3)))
    assert stats.count == ref.count


@pytest.mark.parametrize("stride, padding, stored", [
    ((2, 1), (1, 1), [((1, 1), 1), ((1, 3), 1), ((3, 3), 1)]),  # (1, 3) first: stride 2 in the dim it leaves out
    ((1, 1), (0, 1), [((1, 1), 1), ((1, 3), 1), ((3, 3), 1)]),  # (1, 3) first: that dim's padding shrinks the output
    ((1, 2), (1, 1), [((1, 1), 1), ((3, 1), 2), ((3, 3), 1)]),
    ((1, 1), (1, 1), [((3, 3), 1)]),  # every sub-patch a block of the full one
])
def test_moments_taken_from_the_full_one_only_where_the_positions_agree(stride, padding, stored):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, stride=stride, padding=padding).double()
    geo = layer_geometry(conv)
    x = correlated(3, 4, (9, 8))
    wanted = [((1, 3), (1, 1)), ((3, 1), (2, 1)), ((1, 1), (1, 1))]
    stats = PatchMoments(conv, wanted, full=True)
    stats.update(x)
    for fk, g in [*wanted, ((3, 3), (1, 1))]:
        p = patches(x, geo, fk)
        n = p.shape[1] // g[0]
        ref = torch.stack([p[:, j * n : (j + 1) * n].T @ p[:, j * n : (j + 1) * n] for j in range(g[0])]) / p.shape[0]
        torch.testing.assert_close(stats.moment(fk, g[0]), ref)
    assert sorted(stats.sums) == stored


@pytest.mark.parametrize("stride, families, full, offset_major, sampled", [
    # (1, 3) a block of the full moment; (3, 1) (stride 2 in the dim it leaves out) a grouped sum of its own
    ((1, 2), [((3, 3), (1, 1)), ((1, 3), (1, 1)), ((3, 1), (2, 1)), ((1, 1), (1, 1))], False, {(3, 3)}, False),
    ((1, 2), [((3, 3), (1, 1)), ((1, 3), (1, 1)), ((3, 1), (2, 1)), ((1, 1), (1, 1))], False, {(3, 3)}, True),
    ((1, 1), [((3, 3), (1, 1)), ((1, 1), (2, 1))], False, {(3, 3)}, False),  # (1, 1) too, each group's block a view of the sums
    ((1, 2), [((3, 3), (2, 1)), ((1, 3), (1, 1))], False, {(1, 3)}, False),  # a grouped sum alone: in unfold's order
    ((1, 2), [((3, 3), (2, 1))], True, {(3, 3)}, False),  # the full moment holds the grouped blocks
])
def test_patches_summed_in_offset_major_order_read_back_in_unfolds(stride, families, full, offset_major, sampled):
    """Unfoldings without first-layer groups among their sums copy patches out with the channels of a
    kernel offset side by side and put the sums in unfold's column order when read: every moment, mean
    and cross moment equals the one computed from unfold's patches, for both streams."""
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=1).double()
    geo = layer_geometry(conv)
    images = 12 if sampled else 4
    x, x_comp = correlated(images, 6, (8, 7)), correlated(images, 6, (8, 7), seed=1)
    sampling = Sampling(images=images, per_column=1) if sampled else None  # every 7th full patch, 21st (3, 1), 111th (1, 1)

    def kept(p: torch.Tensor, stats, fk) -> torch.Tensor:  # the rows a sampled moment sums (a block of the full one: the full's)
        unfolding = geo.kernel if fk in stats.within_full else fk
        columns = patches(x[:1], geo, unfolding).shape[1]
        return p if sampling is None else p[:: sampling.step(p.shape[0] // images, columns)]

    stats, cross = PatchMoments(conv, families, full=full, sampling=sampling), CrossMoments(conv, families, sampling=sampling)
    stats.update(x)
    cross.update(x, x_comp)
    assert stats.offset_major == offset_major
    for _ in range(2):  # reading a moment leaves the sums as they were (a block may be a view of them)
        for fk, g in families:
            for moments, inputs, of in ((stats.moment, x, stats), (cross.comp, x_comp, cross)):
                p = kept(patches(inputs, geo, fk), of, fk)
                n = p.shape[1] // g[0]
                ref = torch.stack([p[:, j * n : (j + 1) * n].T @ p[:, j * n : (j + 1) * n] for j in range(g[0])]) / p.shape[0]
                torch.testing.assert_close(moments(fk, g[0]), ref)
    p, pc = kept(patches(x, geo), stats, geo.kernel), kept(patches(x_comp, geo), cross, geo.kernel)
    if sampled:
        assert stats.sampling.step(32, 54) == 7 and len(p) == stats.count
    torch.testing.assert_close(stats.full_mean(), p.mean(0))
    y = kept(conv(x).permute(0, 2, 3, 1).reshape(-1, 5) - conv.bias.detach(), cross, geo.kernel)
    torch.testing.assert_close(cross.output_cross(), y.T @ pc / pc.shape[0])
    torch.testing.assert_close(cross.full_means()[1], pc.mean(0))


def test_sampling_step_leaves_the_patches_per_column_asked_for():
    s = Sampling(images=512, per_column=256)
    assert s.step(784, 288) == 5  # 401,408 patches, 288 columns: every 5th leaves 80,282 >= 256 * 288
    assert 512 * 784 // s.step(784, 288) >= 256 * 288 > 512 * 784 // (s.step(784, 288) + 1)
    assert s.step(16, 2304) == 1  # fewer than asked for: every patch
    assert s.step(784, 32) == 47  # 49 would divide the 784 positions (so would 48): the largest coprime below
    with pytest.raises(SpecError):
        Sampling(images=0)


def test_sampling_keeps_every_position_equally_often_across_images():
    """Over ``step`` images every position of the map is kept once, whatever the step would have been:
    with a step dividing the positions per image, every image would give the same few positions."""
    positions, images = 784, 47 * 3
    step = Sampling(images=images, per_column=1).step(positions, images * positions // 47)
    assert step == 47
    kept = torch.arange(0, images * positions, step) % positions
    assert torch.bincount(kept, minlength=positions).unique().tolist() == [3]


@pytest.mark.parametrize("split", [[7], [2, 5], [1, 3, 3]])
def test_sampled_moments_sum_every_kth_patch_of_the_stream_whatever_the_batches(split):
    """The moments and means sum exactly the patches 0, k, 2k, ... of the images in order (positions
    of one image after the other), however the images are batched; the step is per unfolding."""
    conv = nn.Conv2d(4, 5, 3, stride=(2, 1), padding=1).double()
    geo = layer_geometry(conv)
    x = correlated(7, 4, (9, 9))
    sampling = Sampling(images=7, per_column=3)
    wanted = [((1, 3), (1, 1)), ((1, 1), (2, 1))]
    stats = PatchMoments(conv, wanted, full=True, sampling=sampling)
    for part in x.split(split):
        stats.update(part)
    for fk, g in [*wanted, ((3, 3), (1, 1))]:
        every = patches(x, geo, fk)
        step = sampling.step(every.shape[0] // 7, every.shape[1])
        assert step > 1
        p, n = every[::step], every.shape[1] // g[0]
        ref = torch.stack([p[:, j * n : (j + 1) * n].T @ p[:, j * n : (j + 1) * n] for j in range(g[0])]) / p.shape[0]
        torch.testing.assert_close(stats.moment(fk, g[0]), ref)
    full = patches(x, geo)[:: sampling.step(patches(x, geo).shape[0] // 7, 36)]
    torch.testing.assert_close(stats.full_mean(), full.mean(0))
    assert stats.count == full.shape[0]


def test_sampled_cross_moments_pair_each_output_with_its_own_patch():
    """With the same inputs in both streams, E[y p^T] = W E[p p^T] holds only if each kept output row
    is the one its kept patch makes: sampling takes the same rows of both."""
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=True).double()
    x = correlated(6, 4, (7, 7))
    cross = CrossMoments(conv, [((3, 3), (1, 1))], sampling=Sampling(images=6, per_column=4))
    cross.update(x[:3], x[:3])  # 147 patches streamed, an odd count: the next batch starts at its second row
    cross.update(x[3:], x[3:])
    assert cross.sampling.step(49, 36) == 2 and cross.count == 147
    w = conv.weight.detach().reshape(5, -1)
    torch.testing.assert_close(cross.output_cross(), w @ cross.comp((3, 3))[0])
    mean_y, mean_p = cross.full_means()
    torch.testing.assert_close(mean_y, w @ mean_p)


def test_sampled_moments_of_a_linear_layer_take_every_kth_row():
    lin = nn.Linear(6, 3).double()
    x = torch.randn(5, 4, 6, dtype=D)  # 4 rows of features per image
    stats = PatchMoments(lin, [((1, 1), (1, 1))], sampling=Sampling(images=5, per_column=1))
    stats.update(x[:2])
    stats.update(x[2:])
    step = stats.sampling.step(4, 6)
    assert step == 3
    p = x.reshape(-1, 6)[::step]
    torch.testing.assert_close(stats.moment((1, 1))[0], p.T @ p / p.shape[0])


def test_spectra_of_grouped_second_layers_share_one_whitened_product():
    """The spectrum of a family with a grouped second layer equals its own whitened SVD's, read from the
    ungrouped family's product, and a different weight (a residual) is not served the cached one."""
    from svdnas.lowrank import derivation as dv

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1).double())
    fams = [((1, 3), (1, 1)), ((1, 3), (1, 2)), ((1, 3), (1, 4))]
    derivation = dv.calibrate(model, "whitened", {"0": [LowRankSpec(*f, 1) for f in fams]}, [correlated(4, 4, (6, 6))], "cpu")
    w = model[0].weight.detach()
    for weight in (w, 0.5 * w, w):
        for fam in fams:
            torch.testing.assert_close(derivation.spectrum("0", weight, fam), whitened_svd(weight, fam, derivation.stats["0"].moment((1, 3))).s)


def test_whitening_roots_are_kept_across_layers_within_their_budget(monkeypatch):
    from svdnas.lowrank import derivation as dv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1)).double()
    specs = {"0": [LowRankSpec((3, 1), (1, 1), 2)], "2": [LowRankSpec((3, 1), (1, 1), 2)]}
    made = []
    real = dv.Whitening
    monkeypatch.setattr(dv, "Whitening", lambda *a, **k: made.append(1) or real(*a, **k))
    derivation = dv.calibrate(model, "whitened", specs, [correlated(4, 3, (6, 6))], "cpu")
    for _ in range(2):  # two stages over the same layers: each root computed once
        for name in specs:
            derivation.whitening(name, (3, 1), 1)
    assert len(made) == 2
    derivation.whitening_bytes = 1  # a budget below one root: only the last one asked for is kept
    for name in specs:
        derivation.whitening(name, (3, 1), 1)
    assert len(made) == 3 and len(derivation._whitenings) == 1  # "0" was held; asking for it let "2" go
    derivation.whitening("0", (3, 1), 1)
    assert len(made) == 4


def test_float32_activations_give_float64_moments_to_float32_rounding(monkeypatch):
    from svdnas.lowrank import calibration

    monkeypatch.setattr(calibration, "_GEMM_ROWS", 100)  # several float64 sums of float32 products
    monkeypatch.setattr(calibration, "_BLOCK_COLUMNS", 8)  # the symmetric product in column blocks
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = correlated(4, 6, (8, 8), dtype=torch.float32) + 1.0
    stats = PatchMoments(conv, [((3, 3), (1, 1))], full=True)
    stats.update(x)
    p = patches(x.double(), layer_geometry(conv))
    ref = p.T @ p / p.shape[0]
    got = stats.full_moment()
    assert got.dtype == torch.float64
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6
    assert float((stats.full_mean() - p.mean(0)).abs().max()) < 1e-6
    assert float((got - ref).abs().max() / ref.abs().max()) > 0  # the products were float32's


def test_cholesky_and_eigen_roots_truncate_alike(monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=D)
    x = correlated(5, 4, (6, 6))
    stats = fed(nn.Conv2d(4, 6, 3, padding=1).double(), x, [((3, 1), (1, 1))])
    moment = stats.moment((3, 1), 1)
    chol = whiten.whitened_svd(weight, ((3, 1), (1, 1)), moment)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda c: (c, torch.ones(c.shape[0], dtype=torch.int32)))  # "failed"
    eig = whiten.whitened_svd(weight, ((3, 1), (1, 1)), moment)
    torch.testing.assert_close(chol.s, eig.s)
    for r in (1, 3, 7):
        torch.testing.assert_close(chol.u[..., :r] * chol.s[..., None, :r] @ chol.vh[..., :r, :],
                                   eig.u[..., :r] * eig.s[..., None, :r] @ eig.vh[..., :r, :])


def test_a_cholesky_factor_too_ill_conditioned_to_solve_against_gives_the_eigen_roots_factors(monkeypatch):
    """Where the triangular solve with a (finite) Cholesky factor overflows, the whitening switches to
    the eigendecomposition's root and the SVD is taken again with it: the factors are those of the
    eigen roots, not a mix of the two."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=D)
    stats = fed(nn.Conv2d(4, 6, 3, padding=1).double(), correlated(5, 4, (6, 6)), [((3, 1), (1, 1))])
    moment = stats.moment((3, 1), 1)
    real_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda c: (c, torch.ones(c.shape[0], dtype=torch.int32)))  # "failed"
    eig = whiten.whitened_svd(weight, ((3, 1), (1, 1)), moment)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real_ex)
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda a, b, **k: torch.full_like(b, float("inf")))  # overflowed
    w = whiten.Whitening(moment)
    got = whiten.whitened_svd(weight, ((3, 1), (1, 1)), w)
    assert w._pinv is not None  # the whitening now holds the eigen pair
    torch.testing.assert_close(got.s, eig.s)
    for r in (1, 3, 7):
        torch.testing.assert_close(got.u[..., :r] * got.s[..., None, :r] @ got.vh[..., :r, :],
                                   eig.u[..., :r] * eig.s[..., None, :r] @ eig.vh[..., :r, :])


def test_spectrum_alone_and_factors_kept_per_family(monkeypatch):
    from svdnas.lowrank import derivation as dv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)).double()
    fam = ((3, 1), (1, 1))
    derivation = dv.calibrate(model, "whitened", {"0": [LowRankSpec(*fam, 2)]}, [correlated(4, 4, (6, 6))], "cpu")
    weight = model[0].weight.detach()
    spectrum = derivation.spectrum("0", weight, fam)  # without the factors
    assert not derivation._factors
    calls = []
    real = dv.whitened_svd
    monkeypatch.setattr(dv, "whitened_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(spectrum, derivation.factors("0", weight, fam).s)
    for rank in (1, 2, 3):  # every rank of the family and the super blocks' factors: one decomposition
        derivation.block("0", model[0], [LowRankSpec(*fam, rank)])
    derivation.factors("0", weight, fam)
    assert len(calls) == 1
    other = derivation.factors("0", weight * 2, fam)  # another weight (a residual) is not served the kept ones
    assert len(calls) == 2
    torch.testing.assert_close(other.s, 2 * spectrum)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [(1, 0), (5, 2), (7, 6)])
def test_a_cholesky_factor_is_accepted_only_where_every_entry_is_finite(bad, at):
    """The solvers read a factor's finiteness from its diagonal: a non-finite entry anywhere below it
    reaches the diagonal of its row."""
    torch.manual_seed(0)
    x = torch.randn(20, 8, dtype=D)
    c = x.T @ x
    chol, info = torch.linalg.cholesky_ex(c)
    assert int(info) == 0 and whiten._finite_factor(chol)
    c[at], c[at[::-1]] = bad, bad
    chol, info = torch.linalg.cholesky_ex(c)
    assert not (int(info) == 0 and whiten._finite_factor(chol))
    assert not bool(torch.isfinite(chol).all())  # whatever the factorisation reported,
    assert not whiten._finite_factor(chol)  # its diagonal shows it
