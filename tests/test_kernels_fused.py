"""The fused Triton kernels (through the interpreter on CPU) equal their torch references, value and gradient.

Tolerances. fp32: values and gradients to rtol 1e-5 (atol 1e-5 of the largest magnitude): only the fp32 summation
order differs. bf16 inputs: both backends upcast the same bf16 values exactly, so losses and per-sample stats keep the
fp32 tolerance; the gradient is returned in bf16 by both, so it may differ by one bf16 rounding: rtol 1e-2
(atol 1e-2 of the largest magnitude).
"""
import pytest
import torch

import kernels
from kernels import reference, triton_common, triton_crd, triton_fdfo, triton_nft

BF16, F32 = torch.bfloat16, torch.float32


def make(n, shape, dtype, seed, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g).to(dtype) for _ in range(count)]


def shuffled_groups(n, seed):
    """Arbitrary, non-contiguous ids in shuffled order; groups of 5, 3 or 1 depending on n."""
    size = 5 if n % 5 == 0 else (3 if n % 3 == 0 else 1)
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(1000, generator=g)[: n // size] * 13 - 500).repeat_interleave(size)
    return ids[torch.randperm(n, generator=g)]


def assert_close(actual, expected, *, rtol=1e-5, scale=1e-5):
    atol = scale * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=rtol, atol=atol)


def assert_grad_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype == dtype
    tol = 1e-2 if dtype == BF16 else 1e-5
    atol = tol * float(expected.abs().max()) + 1e-30
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=atol)


def run_both(fn_fused, fn_ref, v):
    """Loss, stats and dL/dv of the fused and the reference path on the same inputs."""
    out = []
    for fn in (fn_fused, fn_ref):
        x = v.detach().clone().requires_grad_()
        loss, stats = fn(x)
        loss.backward()
        out.append((loss, stats, x.grad))
    return out


# (N, trailing shape, dtype, geometry (block, steps) or None for the default): every N in {1, 3, 24, 50} and every
# D in {1, 7, 1000, 3*17*19} appears, in both dtypes, with single- and multi-chunk rows.
CASES = [
    (1, (7,), F32, None),
    (3, (1,), F32, None),
    (24, (3, 17, 19), F32, None),
    (50, (1000,), F32, None),
    (3, (1000,), BF16, None),
    (24, (7,), BF16, None),
    (50, (1,), BF16, None),
    (1, (3, 17, 19), BF16, None),
    (3, (1000,), F32, (64, 2)),        # 8 chunks per row, last one partial
    (3, (3, 17, 19), BF16, (128, 1)),  # 8 chunks per row
]
IDS = [f"N{n}-D{torch.Size(s).numel()}-{str(dt)[6:]}-{'chunks' if geo else 'auto'}" for n, s, dt, geo in CASES]


def geometry(geo):
    return {} if geo is None else {"block": geo[0], "steps": geo[1]}


@pytest.mark.parametrize("n,shape,dtype,geo", CASES, ids=IDS)
@pytest.mark.parametrize("centering,weights", [("group", "adaptive"), ("batch", "adaptive"), ("group", "fixed")])
def test_crd_fused_matches_reference(n, shape, dtype, geo, centering, weights):
    v, v_old, u, pc, pu = make(n, shape, dtype, seed=n, count=5)
    g = torch.Generator().manual_seed(1)
    r01, rho, ids = torch.rand(n, generator=g), torch.rand(n, generator=g), shuffled_groups(n, seed=2)
    kw = dict(beta=0.9, adv_clip=5.0, cfg_scale=4.5, kl_beta=0.1, kl_min=1e-4, centering=centering)
    if weights == "fixed":  # crd.log_ratio: elbo's per-sample weights replace the adaptive ones
        kw["ratio_weight"] = 0.05 + torch.rand(n, generator=g)
    (lf, sf, gf), (lr, sr, gr) = run_both(
        lambda x: triton_crd.crd_loss(x, v_old, u, pc, pu, r01, rho, ids, **kw, **geometry(geo)),
        lambda x: reference.crd_loss(x, v_old, u, pc, pu, r01, rho, ids, **kw), v)
    assert lf.dtype == F32 and lf.shape == ()
    assert_close(lf, lr)
    for key in ("log_ratio", "kl", "w_th", "w_old", "kl_coef", "lc", "rc", "e"):
        assert sf[key].shape == (n,), key
        assert_close(sf[key], sr[key])
    assert_grad_close(gf, gr, dtype)


@pytest.mark.parametrize("n,shape,dtype,geo", CASES, ids=IDS)
def test_nft_fused_matches_reference(n, shape, dtype, geo):
    v, v_old, v_pre, x_t, x0 = make(n, shape, dtype, seed=n + 1, count=5)
    g = torch.Generator().manual_seed(3)
    sigma, r01 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    kw = dict(beta=0.4, adv_clip=5.0, kl_beta=0.01)
    (lf, sf, gf), (lr, sr, gr) = run_both(
        lambda x: triton_nft.nft_loss(x, v_old, v_pre, x_t, x0, sigma, r01, **kw, **geometry(geo)),
        lambda x: reference.nft_loss(x, v_old, v_pre, x_t, x0, sigma, r01, **kw), v)
    assert lf.dtype == F32
    assert_close(lf, lr)
    for key in ("l_pos", "l_neg", "w_pos", "w_neg", "kl"):
        assert_close(sf[key], sr[key])
    assert_grad_close(gf, gr, dtype)


def test_nft_scalar_sigma():
    v, v_old, v_pre, x_t, x0 = make(3, (7,), F32, seed=0, count=5)
    r01, sigma = torch.rand(3), torch.tensor(0.6)
    (lf, _, gf), (lr, _, gr) = run_both(
        lambda x: kernels.nft_loss(x, v_old, v_pre, x_t, x0, sigma, r01, backend="triton"),
        lambda x: kernels.nft_loss(x, v_old, v_pre, x_t, x0, sigma, r01, backend="torch"), v)
    assert_close(lf, lr)
    assert_grad_close(gf, gr, F32)


PAIR_CASES = [(2, (7,), F32, None), (24, (1,), F32, None), (50, (1000,), BF16, None), (24, (3, 17, 19), F32, None),
              (2, (1000,), F32, (64, 2))]


@pytest.mark.parametrize("n,shape,dtype,geo", PAIR_CASES)
def test_fdfo_pairs_fused_matches_reference(n, shape, dtype, geo):
    (x,) = make(n, shape, dtype, seed=n, count=1)
    x[-2:] = x[-1:]  # one pair with identical branches: dxh = 0 there
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(1))
    dR, dxh = triton_fdfo.fdfo_pairs(x, rewards, **geometry(geo))
    dR_ref, dxh_ref = reference.fdfo_pairs(x, rewards)
    assert dxh.shape == x.shape and dxh.dtype == F32
    assert torch.equal(dR, dR_ref)
    assert_close(dxh, dxh_ref)
    assert torch.equal(dxh[-1], torch.zeros_like(dxh[-1]))
    assert torch.equal(dxh[0::2], -dxh[1::2])


# (items M, branches B, trailing shape, dtype, geometry)
LOSS_CASES = [(1, 1, (7,), F32, None), (3, 2, (1,), F32, None), (24, 6, (3, 17, 19), BF16, None),
              (50, 10, (1000,), F32, None), (50, 50, (7,), BF16, None), (3, 2, (1000,), F32, (64, 2))]


@pytest.mark.parametrize("m,b,shape,dtype,geo", LOSS_CASES)
def test_fdfo_loss_fused_matches_reference(m, b, shape, dtype, geo):
    v, noise, x_final = make(m, shape, dtype, seed=m, count=3)
    v_ref = (v.float() + 0.05 * noise.float()).to(dtype)
    (xb,) = make(b + b % 2, shape, F32, seed=9, count=1)
    dR, dxh = reference.fdfo_pairs(xb, torch.randn(b + b % 2))
    dxh, dR = dxh[:b] * 0.1, dR[:b]
    index = None if m == b else torch.randint(0, b, (m,), generator=torch.Generator().manual_seed(4))
    (lf, sf, gf), (lr, sr, gr) = run_both(
        lambda x: triton_fdfo.fdfo_loss(x, v_ref, dxh, dR, clip=0.03, item_index=index, **geometry(geo)),
        lambda x: reference.fdfo_loss(x, v_ref, dxh, dR, clip=0.03, item_index=index), v)
    assert lf.dtype == F32
    assert_close(lf, lr)
    assert_close(sf["ratio"], sr["ratio"])
    assert_close(sf["log_ratio"], sr["log_ratio"])
    assert_grad_close(gf, gr, dtype)


# ------------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,geo", [(F32, None), (BF16, None), (F32, (64, 2))])
def test_crd_log_ratio_exactly_zero_when_v_equals_v_old(backend, dtype, geo):
    v, u, pc, pu = make(5, (1000,), dtype, seed=11, count=4)
    r01, rho, ids = torch.rand(5), torch.rand(5), torch.tensor([4, 9, 4, 9, 4])
    if backend == "triton":
        _, st = triton_crd.crd_loss(v, v.clone(), u, pc, pu, r01, rho, ids, **geometry(geo))
    else:
        _, st = kernels.crd_loss(v, v.clone(), u, pc, pu, r01, rho, ids, backend="torch")
    assert torch.equal(st["log_ratio"], torch.zeros(5))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,geo", [(F32, None), (BF16, None), (F32, (64, 2))])
def test_fdfo_ratio_exactly_one_when_v_equals_v_ref(backend, dtype, geo):
    v, x = make(6, (1000,), dtype, seed=12, count=2)
    dR, dxh = kernels.fdfo_pairs(x[:4], torch.randn(4), backend=backend)
    index = torch.tensor([0, 1, 2, 3, 1, 2])
    if backend == "triton":
        _, st = triton_fdfo.fdfo_loss(v, v.clone(), dxh, dR, item_index=index, **geometry(geo))
    else:
        _, st = kernels.fdfo_loss(v, v.clone(), dxh, dR, item_index=index, backend="torch")
    assert torch.equal(st["ratio"], torch.ones(6))


def test_crd_fused_loss_invariant_to_constant_added_to_one_group_rewards():
    n = 24
    v, v_old, u, pc, pu = make(n, (7,), F32, seed=13, count=5)
    ids, rho = shuffled_groups(n, seed=5), torch.rand(n)
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(6))
    losses = []
    for r in (rewards, rewards + 2.5 * (ids == ids[0])):
        _, r01, _ = kernels.group_advantages(r, ids, global_std=False)
        losses.append(kernels.crd_loss(v, v_old, u, pc, pu, r01, rho, ids, backend="triton")[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_crd_fused_equal_rewards_gradient_only_pulls_lc_to_zero():
    n, d = 6, 1000
    v, v_old, u, pc, pu = make(n, (d,), F32, seed=14, count=5)
    v.requires_grad_()
    ids, rho = torch.tensor([3, 8, 3, 8, 3, 8]), torch.rand(n)
    r01 = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.5, 0.4])  # group 3: equal rewards -> rc = 0 there
    loss, st = kernels.crd_loss(v, v_old, u, pc, pu, r01, rho, ids, kl_beta=0.0, kl_min=0.0, backend="triton")
    loss.backward()
    rows = ids == 3
    assert torch.equal(st["rc"][rows], torch.zeros(3))
    # dL/dl_i = (2 A_max beta / N) lc_i: the gradient of (A_max beta / N) sum lc^2, nothing from the rewards
    expected = (2 * 5.0 / n) * st["lc"][rows, None] * (-(2 / d) * (v.detach()[rows] - u[rows]) / st["w_th"][rows, None])
    torch.testing.assert_close(v.grad[rows], expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_crd_group_mean_fn_centers_groups_split_across_ranks(backend):
    """Two simulated ranks each hold half of every group; a gathering ``group_mean_fn`` makes the rank-weighted sum
    of their losses and their gradients equal the single-process loss on the whole batch."""
    n = 12
    v, v_old, u, pc, pu = make(n, (7,), F32, seed=15, count=5)
    r01, rho, ids = torch.rand(n), torch.rand(n), torch.tensor([5, 5, 9, 9, 2, 2] * 2)  # rank k: rows 6k..6k+5
    full_v = v.clone().requires_grad_()
    full, _ = kernels.crd_loss(full_v, v_old, u, pc, pu, r01, rho, ids, backend=backend)
    full.backward()

    # stands in for an all-gather of the detached [N, 2] scalars: compute both ranks' values, take group means
    with torch.no_grad():
        _, st = kernels.crd_loss(v, v_old, u, pc, pu, r01, rho, ids, backend=backend)
    gathered = torch.stack([st["log_ratio"], r01], dim=1)
    all_means = reference.local_group_mean(gathered, ids)
    total, grads, rank_losses = 0.0, [], []
    for rank in range(2):
        rows = slice(6 * rank, 6 * rank + 6)
        vr = v[rows].clone().requires_grad_()
        loss, _ = kernels.crd_loss(vr, v_old[rows], u[rows], pc[rows], pu[rows], r01[rows], rho[rows], ids[rows],
                                   group_mean_fn=lambda values, gids, rows=rows: all_means[rows], backend=backend)
        (loss * 6 / n).backward()
        total, grads = total + loss.detach() * 6 / n, grads + [vr.grad]
        rank_losses.append(loss.detach())
    torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat(grads), full_v.grad, rtol=1e-5, atol=1e-9)
    # the default (local) centering gives another loss here: each rank holds only half of every group
    local, _ = kernels.crd_loss(v[:6], v_old[:6], u[:6], pc[:6], pu[:6], r01[:6], rho[:6], ids[:6], backend=backend)
    assert abs(float(local) - float(rank_losses[0])) > 1e-3


def test_fused_gradient_in_bf16_and_trailing_shape_restored():
    v, v_old, u, pc, pu = make(3, (3, 17, 19), BF16, seed=1, count=5)
    v = v.transpose(2, 3).requires_grad_()  # non-contiguous input
    loss, _ = kernels.crd_loss(v, v_old.transpose(2, 3), u.transpose(2, 3), pc.transpose(2, 3), pu.transpose(2, 3),
                               torch.rand(3), torch.rand(3), torch.tensor([0, 0, 1]), backend="triton")
    loss.backward()
    assert v.grad.shape == v.shape and v.grad.dtype == BF16 and bool(torch.isfinite(v.grad).all())


# --------------------------------------------------------------------------------------------------- dispatch
def test_default_geometry_keeps_interpreter_grids_small():
    geo = triton_common.launch(50, 3 * 17 * 19)
    assert geo.chunks == 1 and geo.block == 1024 and geo.block & (geo.block - 1) == 0
    assert triton_common.launch(8, 16 * 64 * 64).chunks * 8 <= 128


def test_auto_runs_triton_under_the_interpreter_on_cpu(monkeypatch):
    calls = []
    fused = triton_crd.crd_loss
    monkeypatch.setattr(triton_crd, "crd_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    v, v_old, u, pc, pu = make(3, (7,), F32, seed=0, count=5)
    args = (v, v_old, u, pc, pu, torch.rand(3), torch.rand(3), torch.tensor([1, 1, 2]))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("auto", v) == "triton"
    kernels.crd_loss(*args)
    assert len(calls) == 1
    kernels.crd_loss(*args, backend="torch")  # forced reference: the fused path is not called
    assert len(calls) == 1
    kernels.crd_loss(*(a.double() if a.is_floating_point() else a for a in args))  # fp64: reference
    assert len(calls) == 1


def test_auto_is_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    v = torch.randn(2, 3)
    assert kernels.resolve_backend("auto", v) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.resolve_backend("triton", v)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("cuda", v)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float64"):
        kernels.resolve_backend("triton", v.double())


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_every_public_function_runs_on_both_backends(backend):
    v, v_old, v_pre, x_t, x0 = make(4, (2, 3), F32, seed=2, count=5)
    v.requires_grad_()
    adv, r01, st = kernels.group_advantages(torch.randn(4), torch.tensor([7, 7, 2, 2]), backend=backend)
    total = kernels.crd_loss(v, v_old, x_t, v_pre, x0, r01, r01, torch.tensor([7, 7, 2, 2]), backend=backend)[0]
    total = total + kernels.nft_loss(v, v_old, v_pre, x_t, x0, torch.rand(4), r01, backend=backend)[0]
    dR, dxh = kernels.fdfo_pairs(x0, torch.randn(4), backend=backend)
    total = total + kernels.fdfo_loss(v, v_old, dxh, dR, backend=backend)[0]
    total.backward()
    assert bool(torch.isfinite(v.grad).all()) and float(v.grad.abs().sum()) > 0
