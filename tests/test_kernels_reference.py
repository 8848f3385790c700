"""The torch references (the spec in code): hand-checked values, gradcheck in fp64, and the invariants of methods.md."""
import math

import pytest
import torch

import kernels
from kernels import reference

F64 = torch.float64


def shuffled_groups(num_groups: int, group_size: int, seed: int = 0) -> torch.Tensor:
    """Arbitrary (negative, non-contiguous) ids, each repeated ``group_size`` times, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10_000, generator=g)[:num_groups] * 7 - 3_000
    ids = ids.repeat_interleave(group_size)
    return ids[torch.randperm(ids.numel(), generator=g)]


def latents(n, *shape, dtype=torch.float32, seed=0, count=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g, dtype=torch.float32).to(dtype) for _ in range(count)]


# ------------------------------------------------------------------------------------------ group advantages
def test_group_inverse_matches_unique():
    ids = shuffled_groups(9, 4, seed=3)
    inverse, num = reference.group_inverse(ids)
    expected = torch.unique(ids, return_inverse=True)[1]
    assert torch.equal(inverse, expected)
    assert int(num) == 9


def test_group_advantages_hand_computed():
    # groups: id 40 -> [1, 3], id -2 -> [5] (one member), id 7 -> [2, 2] (all equal)
    rewards = torch.tensor([1.0, 5.0, 2.0, 3.0, 2.0])
    ids = torch.tensor([40, -2, 7, 40, 7])
    std = torch.tensor([1.0, 5.0, 2.0, 3.0, 2.0]).std(unbiased=False)
    adv, r01, stats = kernels.group_advantages(rewards, ids, adv_clip=5.0)
    expected = torch.tensor([-1.0 / std, 0.0, 0.0, 1.0 / std, 0.0])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(r01, 0.5 + expected / 10)
    assert math.isclose(float(stats["zero_std_fraction"]), 2 / 3, rel_tol=1e-6)  # the single and the equal group

    adv_g, r01_g, _ = kernels.group_advantages(rewards, ids, global_std=False)
    torch.testing.assert_close(adv_g, torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0]))  # per-group std of [1, 3] is 1
    assert float(r01_g[1]) == 0.5  # documented: a one-member group has advantage 0


def test_group_advantages_clips_and_maps_to_unit_interval():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0])
    ids = torch.zeros(10, dtype=torch.long)
    adv, r01, _ = kernels.group_advantages(rewards, ids, adv_clip=2.0)
    assert float(adv.max()) == 2.0 and float(r01.max()) == 1.0
    assert float(r01.min()) >= 0.0


def test_group_advantages_equal_rewards_give_exact_zero():
    # 0.7 three times: the mean is not exactly 0.7 in fp32, but the documented advantage is exactly 0
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.1, 0.9])
    ids = torch.tensor([5, 5, 5, 6, 6])
    for global_std in (True, False):
        adv, r01, stats = kernels.group_advantages(rewards, ids, global_std=global_std)
        assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(r01[:3], torch.full((3,), 0.5))
        assert float(stats["zero_std_fraction"]) == 0.5


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_gradcheck(global_std):
    rewards = torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ids = shuffled_groups(3, 4)
    # a large clip keeps the function smooth at these inputs
    fn = lambda r: reference.group_advantages(r, ids, global_std=global_std, adv_clip=50.0)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (rewards,))


# ----------------------------------------------------------------------------------------------------- CRD
def crd_inputs(n, d, dtype=F64, seed=0, groups=None):
    v, v_old, u, pc, pu = latents(n, d, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    r01, rho = torch.rand(n, generator=g, dtype=F64).to(dtype), torch.rand(n, generator=g, dtype=F64).to(dtype)
    ids = groups if groups is not None else shuffled_groups(n // 3, 3, seed)
    return v.requires_grad_(), v_old, u, pc, pu, r01, rho, ids


@pytest.mark.parametrize("centering", ["group", "batch"])
def test_crd_gradcheck_fp64(monkeypatch, centering):
    # The stop-gradient weight w_th = sg(max(mean|v - u|, floor)) is constant where the floor is active, so
    # raising the floor makes the numerical derivative comparable (the sg'd baseline never contributes: lc and rc
    # are both centered, so sum_g e = 0).
    monkeypatch.setattr(reference, "WEIGHT_FLOOR", 10.0)
    v, v_old, u, pc, pu, r01, rho, ids = crd_inputs(6, 5)
    fn = lambda x: reference.crd_loss(x, v_old, u, pc, pu, r01, rho, ids, beta=0.7, centering=centering)[0]  # noqa
    assert torch.autograd.gradcheck(fn, (v,))


def test_crd_per_sample_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    l, kl = torch.randn(9, generator=g, dtype=F64), torch.rand(9, generator=g, dtype=F64)
    r01, rho, ids = torch.rand(9, generator=g, dtype=F64), torch.rand(9, generator=g, dtype=F64), shuffled_groups(3, 3)
    fn = lambda a, b: reference.crd_per_sample(a, b, r01, rho, ids, beta=1.3, adv_clip=5.0, kl_beta=0.1,  # noqa
                                                kl_min=1e-4, centering="group")[0]
    assert torch.autograd.gradcheck(fn, (l.requires_grad_(), kl.requires_grad_()))


@pytest.mark.parametrize("centering", ["group", "batch"])
def test_crd_gradient_formula_of_methods_md(centering):
    n, d = 12, 7
    v, v_old, u, pc, pu, r01, rho, ids = crd_inputs(n, d)
    beta, adv_clip, cfg, kl_beta, kl_min = 0.8, 5.0, 4.5, 0.1, 1e-4
    loss, st = reference.crd_loss(v, v_old, u, pc, pu, r01, rho, ids, beta=beta, adv_clip=adv_clip, cfg_scale=cfg,
                                  kl_beta=kl_beta, kl_min=kl_min, centering=centering)
    loss.backward()
    v_cfg = pu + cfg * (pc - pu)
    e = (beta * st["lc"] - st["rc"])[:, None]
    c = (kl_min + (kl_beta - kl_min) * rho)[:, None]
    x = v.detach()
    formula = (2 * adv_clip / n) * e * (-(2 / d) * (x - u) / st["w_th"][:, None]) + (2 * c / (n * d)) * (x - v_cfg)
    torch.testing.assert_close(v.grad, formula, rtol=1e-12, atol=1e-14)


def test_crd_elbo_weight_makes_the_log_ratio_the_elbo_difference_in_nats():
    """``crd.log_ratio: elbo``: with ``ratio_weight = sigma / ((1 - sigma) D)`` the log-ratio is
    ``(1 - sigma)/sigma sum_pix[(v_old - u)^2 - (v - u)^2]`` (VDM's ELBO weighting), and the gradient is the
    methods.md formula with ``w_th`` replaced by that weight."""
    from engine.methods.crd import elbo_weight
    n, d = 9, 6
    v, v_old, u, pc, pu, r01, rho, ids = crd_inputs(n, d)
    sigma = torch.linspace(0.1, 0.95, n, dtype=F64)
    w = elbo_weight(sigma, v).double()
    loss, st = reference.crd_loss(v, v_old, u, pc, pu, r01, rho, ids, beta=0.7, kl_beta=0.0, kl_min=0.0,
                                  ratio_weight=w)
    want = (1 - sigma) / sigma * ((v_old - u).square().sum(1) - (v.detach() - u).square().sum(1))
    torch.testing.assert_close(st["log_ratio"], want, rtol=1e-6, atol=1e-9)  # elbo_weight is fp32
    loss.backward()
    e = (0.7 * st["lc"] - st["rc"])[:, None]
    formula = (2 * 5.0 / n) * e * (-(2 / d) * (v.detach() - u) / w[:, None])
    torch.testing.assert_close(v.grad, formula, rtol=1e-12, atol=1e-14)


def test_crd_log_ratio_exactly_zero_on_policy():
    v, _, u, pc, pu, r01, rho, ids = crd_inputs(9, 13, dtype=torch.float32)
    _, st = reference.crd_loss(v, v.detach().clone(), u, pc, pu, r01, rho, ids)
    assert torch.equal(st["log_ratio"], torch.zeros(9))


def test_crd_loss_invariant_to_constant_added_to_one_group_rewards():
    n, d = 12, 7
    v, v_old, u, pc, pu, _, rho, _ = crd_inputs(n, d, dtype=torch.float32)
    ids = shuffled_groups(4, 3, seed=5)
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(4))
    shifted = rewards + 3.0 * (ids == ids[0])
    # per-group std: the whole pipeline (advantages -> r01 -> loss) is shift-invariant per group. (With the global
    # std the scale of every advantage changes, so only the loss-level invariance below holds there.)
    losses = []
    for r in (rewards, shifted):
        _, r01, _ = kernels.group_advantages(r, ids, global_std=False)
        losses.append(reference.crd_loss(v, v_old, u, pc, pu, r01, rho, ids)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    # loss level: r01 shifted by a constant in one group
    _, r01, _ = kernels.group_advantages(rewards, ids)
    base = reference.crd_loss(v, v_old, u, pc, pu, r01, rho, ids)[0]
    moved = reference.crd_loss(v, v_old, u, pc, pu, r01 + 0.25 * (ids == ids[0]), rho, ids)[0]
    torch.testing.assert_close(base, moved, rtol=1e-6, atol=0)


def test_crd_equal_rewards_gradient_only_pulls_lc_to_zero():
    n, d = 6, 11
    v, v_old, u, pc, pu, _, rho, _ = crd_inputs(n, d)
    ids = torch.tensor([3, 3, 3, 8, 8, 8])
    r01 = torch.tensor([0.5, 0.5, 0.5, 0.2, 0.9, 0.4], dtype=F64)  # group 3: equal rewards -> rc = 0
    kw = dict(kl_beta=0.0, kl_min=0.0, beta=1.0)  # KL off: only the CRD term
    loss, st = reference.crd_loss(v, v_old, u, pc, pu, r01, rho, ids, **kw)
    loss.backward()
    assert torch.equal(st["rc"][:3], torch.zeros(3, dtype=F64))
    # the gradient of group 3 is that of (A_max beta / N) sum lc^2: dL/dl_i = (2 A_max beta / N) lc_i
    expected = (2 * 5.0 / n) * st["lc"][:3, None] * (-(2 / d) * (v.detach()[:3] - u[:3]) / st["w_th"][:3, None])
    torch.testing.assert_close(v.grad[:3], expected, rtol=1e-12, atol=1e-15)
    # and a small step along -grad shrinks that group's |lc|
    lc_before = st["lc"][:3].square().sum()
    with torch.no_grad():
        stepped = v - 1e-2 * v.grad
    _, st2 = reference.crd_loss(stepped, v_old, u, pc, pu, r01, rho, ids, **kw)
    assert st2["lc"][:3].square().sum() < lc_before


def test_crd_equal_rewards_and_equal_samples_give_zero_gradient():
    d = 5
    v, v_old, u, pc, pu, _, rho, _ = crd_inputs(1, d)
    rep = lambda t: t.detach().repeat(3, 1)  # noqa: E731  three identical samples: lc = 0 exactly
    vv = rep(v).requires_grad_()
    loss, st = reference.crd_loss(vv, rep(v_old), rep(u), rep(pc), rep(pu), torch.full((3,), 0.5, dtype=F64),
                                  rho.repeat(3), torch.tensor([1, 1, 1]), kl_beta=0.0, kl_min=0.0)
    loss.backward()
    assert torch.equal(vv.grad, torch.zeros_like(vv.grad)) and float(loss.detach()) == 0.0


# ----------------------------------------------------------------------------------------------------- NFT
def test_nft_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(reference, "WEIGHT_FLOOR", 10.0)  # freezes the sg'd weights (see the CRD gradcheck)
    v, v_old, v_pre, x_t, x0 = latents(5, 2, 3, dtype=F64, seed=3)
    g = torch.Generator().manual_seed(7)
    sigma, r01 = torch.rand(5, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
    fn = lambda x: reference.nft_loss(x, v_old, v_pre, x_t, x0, sigma, r01, beta=0.4, kl_beta=0.3)[0]  # noqa
    assert torch.autograd.gradcheck(fn, (v.requires_grad_(),))


def test_nft_gradient_formula():
    n, d, beta, kl_beta = 4, 6, 0.3, 0.05
    v, v_old, v_pre, x_t, x0 = latents(n, d, dtype=F64, seed=4)
    sigma, r01 = torch.rand(n, dtype=F64), torch.rand(n, dtype=F64)
    v.requires_grad_()
    loss, st = reference.nft_loss(v, v_old, v_pre, x_t, x0, sigma, r01, beta=beta, kl_beta=kl_beta)
    loss.backward()
    x, s = v.detach(), sigma[:, None]
    e_pos = x_t - s * (beta * x + (1 - beta) * v_old) - x0
    e_neg = x_t - s * ((1 + beta) * v_old - beta * x) - x0
    formula = (5.0 / (beta * n)) * (r01[:, None] * (2 / d) * e_pos * (-s * beta) / st["w_pos"][:, None]
                                    + (1 - r01[:, None]) * (2 / d) * e_neg * (s * beta) / st["w_neg"][:, None])
    formula = formula + kl_beta * (2 / (n * d)) * (x - v_pre)
    torch.testing.assert_close(v.grad, formula, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- FDFO
def test_fdfo_pairs_values():
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0], [0.5, 0.5], [0.5, 0.5]])
    rewards = torch.tensor([1.0, 4.0, 2.0, 2.0])
    dR, dxh = kernels.fdfo_pairs(x, rewards, backend="torch")
    torch.testing.assert_close(dR, torch.tensor([-1.5, 1.5, 0.0, 0.0]))
    dx = torch.tensor([-1.0, 2.0])  # (x_a - x_b) / 2, mean square 2.5
    torch.testing.assert_close(dxh[0], dx / (2.5 + 1e-6))
    torch.testing.assert_close(dxh[1], -dx / (2.5 + 1e-6))
    assert torch.equal(dxh[2:], torch.zeros(2, 2))  # identical branches: no direction


def test_fdfo_loss_gradcheck_and_formula_fp64():
    m, b, d, clip = 7, 4, 5, 0.03
    v, v_ref, dxh = latents(m, d, dtype=F64, seed=5, count=3)
    dxh = dxh[:b] * 0.3
    v_ref = v.detach() + 0.05 * v_ref  # near on-policy: ratios close to 1, as in training
    dR = torch.randn(b, dtype=F64, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([0, 1, 2, 3, 2, 1, 0])
    fn = lambda x: reference.fdfo_loss(x, v_ref, dxh, dR, clip=clip, item_index=index)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v.requires_grad_(),))
    loss, st = reference.fdfo_loss(v, v_ref, dxh, dR, clip=clip, item_index=index)
    loss.backward()
    rho, dr = st["ratio"][:, None], dR[index][:, None]
    dl_drho = -dr + dr.abs() / clip * (rho - 1)
    formula = (1 / m) * dl_drho * rho * (-(2 / d) * (v.detach() - (v_ref - dxh[index])))
    torch.testing.assert_close(v.grad, formula, rtol=1e-10, atol=1e-14)


def test_fdfo_ratio_exactly_one_on_policy():
    v, dxh = latents(6, 3, 4, seed=6, count=2)
    dR = torch.randn(6)
    _, st = reference.fdfo_loss(v, v.clone(), dxh * 1e-3, dR)  # tiny dxh: v - (v - dxh) would round; we don't
    assert torch.equal(st["ratio"], torch.ones(6))
