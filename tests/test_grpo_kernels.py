"""The fused Flow-GRPO kernel (Triton interpreter on CPU) equals its torch reference, value and gradient, over dtypes,
odd sizes, forced chunk geometries, both SDE types, with and without the KL; and the invariants the engine relies on
(ratio exactly 1 on identical inputs, log-probs independent of how many rows a call has).

Tolerances as tests/test_kernels_fused.py: fp32 values and gradients rtol 1e-5; bf16 inputs are upcast identically by
both paths (values at the fp32 tolerance), the bf16 gradient may differ by one bf16 rounding (rtol 1e-2).
"""
import pytest
import torch

import kernels
from kernels import reference, triton_grpo
from models.samplers import flow_match_sigmas
from tests.test_kernels_fused import BF16, F32, assert_close, assert_grad_close, geometry, run_both, shuffled_groups


def batch(n, shape, dtype, sde_type, seed):
    """n samples at random steps of the SD3 table: x_t, the rollout velocity, its sampled x_next, coefficients."""
    g = torch.Generator().manual_seed(seed)
    table = flow_match_sigmas(10, shift=3.0)
    steps = torch.randint(0, 9, (n,), generator=g)
    coef = reference.grpo_coefficients(table[steps], table[steps + 1], noise_level=0.7, sde_type=sde_type,
                                       sigma_max=table[1])
    x, v_old, xi = (torch.randn(n, *shape, generator=g).to(dtype) for _ in range(3))
    x_next = reference.grpo_step(x, v_old, coef, xi)
    return x, v_old, x_next, coef, g


# (N, trailing shape, dtype, geometry): every N in {1, 3, 24} and D in {1, 7, 1000, 3*17*19}, both dtypes,
# single- and multi-chunk rows
CASES = [(1, (7,), F32, None), (3, (1,), F32, None), (24, (3, 17, 19), F32, None), (3, (1000,), BF16, None),
         (24, (7,), BF16, None), (3, (1000,), F32, (64, 2)), (3, (3, 17, 19), BF16, (128, 1))]
IDS = [f"N{n}-D{torch.Size(s).numel()}-{str(dt)[6:]}-{'chunks' if geo else 'auto'}" for n, s, dt, geo in CASES]


@pytest.mark.parametrize("n,shape,dtype,geo", CASES, ids=IDS)
@pytest.mark.parametrize("sde_type,kl", [("sde", True), ("sde", False), ("cps", True)])
def test_grpo_fused_matches_reference(n, shape, dtype, geo, sde_type, kl):
    x, v_old, x_next, coef, g = batch(n, shape, dtype, sde_type, seed=n)
    lp_old = reference.grpo_logprob(v_old, x, x_next, coef)
    v = (v_old.float() + 0.01 * torch.randn(n, *shape, generator=g)).to(dtype)
    v_ref = (v_old.float() + 0.05 * torch.randn(n, *shape, generator=g)).to(dtype) if kl else None
    # advantages from shuffled, non-contiguous group ids (the engine's order), some beyond the clip
    adv, _, _ = reference.group_advantages(3 * torch.randn(n, generator=g), shuffled_groups(n, seed=n),
                                           adv_clip=100.0, std_floor="additive")
    if n == 1:  # a group of one has advantage 0: give the lone sample one, so its gradient is not trivially 0
        adv = torch.tensor([2.0])
    kw = dict(v_ref=v_ref, clip_range=1e-3, adv_clip=5.0, kl_beta=0.04)
    (lf, sf, gf), (lr, sr, gr) = run_both(
        lambda t: triton_grpo.grpo_loss(t, x, x_next, lp_old, adv, coef, **kw, **geometry(geo)),
        lambda t: reference.grpo_loss(t, x, x_next, lp_old, adv, coef, **kw), v)
    assert lf.dtype == F32
    assert_close(lf, lr)
    for key in ("log_prob", "ratio", "log_ratio", "policy_loss", "approx_kl") + (("kl",) if kl else ()):
        assert_close(sf[key], sr[key])
    for key in ("clipped", "clipped_high", "clipped_low"):
        assert torch.equal(sf[key], sr[key])
    assert_grad_close(gf, gr, dtype)
    assert float(gr.float().abs().max()) > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("sde_type,dtype,geo", [("sde", F32, None), ("cps", BF16, None), ("sde", F32, (64, 2))])
def test_ratio_exactly_one_and_kl_exactly_zero_on_policy(backend, sde_type, dtype, geo):
    """The rollout's stored log-prob and the training loss's, on the same inputs, are the same bits (ratio 1), and a
    reference equal to the policy gives KL exactly 0."""
    x, v, x_next, coef, _ = batch(6, (1000,), dtype, sde_type, seed=3)
    if backend == "triton":
        lp_old = triton_grpo.grpo_logprob(v, x, x_next, coef, **geometry(geo))
        _, st = triton_grpo.grpo_loss(v, x, x_next, lp_old, torch.randn(6), coef, v_ref=v.clone(), **geometry(geo))
    else:
        lp_old = kernels.grpo_logprob(v, x, x_next, coef, backend="torch")
        _, st = kernels.grpo_loss(v, x, x_next, lp_old, torch.randn(6), coef, v_ref=v.clone(), backend="torch")
    assert torch.equal(st["ratio"], torch.ones(6)) and torch.equal(st["kl"], torch.zeros(6))
    assert torch.equal(st["clipped"], torch.zeros(6))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_log_prob_does_not_depend_on_the_rows_of_a_call(backend):
    """The rollout computes log-probs per sampler chunk, the update per micro-batch (of kept rows): any subset of rows
    gets bit-identical log-probs."""
    x, v, x_next, coef, _ = batch(9, (3, 17, 19), F32, "sde", seed=5)
    whole = kernels.grpo_logprob(v, x, x_next, coef, backend=backend)
    rows = torch.tensor([7, 2, 4])
    part = kernels.grpo_logprob(v[rows], x[rows], x_next[rows], coef[rows], backend=backend)
    assert torch.equal(part, whole[rows])


def test_gradient_is_the_analytic_one():
    """dL/dv = dL/dlp (2 b inv2var / D)(x_next - mean) + dL/dkl (2 kl_scale b^2 / D)(v - v_ref), checked in fp64
    against autograd's own differentiation of the reference (gradcheck) and against the closed form."""
    x, v_old, x_next, coef, g = batch(4, (5,), torch.float64, "sde", seed=7)
    coef = coef.double()
    lp_old = reference.grpo_logprob(v_old, x, x_next, coef)
    v = (v_old + 1e-3 * torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    v_ref = v_old + 0.05 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, 7.0], dtype=torch.float64)
    def f(t):
        return reference.grpo_loss(t, x, x_next, lp_old, adv, coef, v_ref=v_ref, clip_range=1.0, kl_beta=0.3)[0]

    assert torch.autograd.gradcheck(f, (v,))
    f(v).backward()
    a, b = coef[:, reference.GRPO_A:1], coef[:, 1:2]
    mean = a * x + b * v.detach()
    lp = reference.grpo_logprob(v.detach(), x, x_next, coef)
    ratio = torch.exp(lp - lp_old)
    A = adv.clamp(-5, 5)
    g_lp = (-A * ratio / 4).unsqueeze(1)  # clip_range 1: nothing clipped here
    d = 5
    expect = (g_lp * 2 * b * coef[:, 3:4] / d * (x_next - mean)
              + 0.3 / 4 * 2 * coef[:, 5:6] * b ** 2 / d * (v.detach() - v_ref))
    torch.testing.assert_close(v.grad, expect, rtol=1e-10, atol=1e-12)


def test_bad_inputs_fail_with_one_sentence():
    x, v, x_next, coef, _ = batch(3, (4,), F32, "sde", seed=1)
    with pytest.raises(ValueError, match="`coef` must be a floating-point tensor of shape"):
        kernels.grpo_loss(v, x, x_next, torch.zeros(3), torch.zeros(3), coef[:, :5])
    with pytest.raises(ValueError, match="`lp_old` has shape"):
        kernels.grpo_loss(v, x, x_next, torch.zeros(2), torch.zeros(3), coef)
    with pytest.raises(ValueError, match="`clip_range` must be > 0"):
        kernels.grpo_loss(v, x, x_next, torch.zeros(3), torch.zeros(3), coef, clip_range=0.0)
    with pytest.raises(ValueError, match="`v_ref` has shape"):
        kernels.grpo_loss(v, x, x_next, torch.zeros(3), torch.zeros(3), coef, v_ref=v[:2])
    with pytest.raises(ValueError, match="sde_type"):
        reference.grpo_coefficients(torch.ones(1), torch.zeros(1), noise_level=0.7, sde_type="ode")
