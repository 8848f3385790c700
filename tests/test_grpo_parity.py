"""Flow-GRPO parity with the official trainer (yifan123/flow_grpo) on identical inputs.

The official formulas are transcribed by hand below (never imported), from:
- ``sde`` step: ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` at commit ac4c86e (the mirrored snapshot):
  the fp32 casts lines 35-38, ``dt`` line 45, ``std_dev_t`` line 47, ``prev_sample_mean`` line 50, the sampled
  ``prev_sample`` line 59, the log-prob lines 61-65 and its mean over all non-batch dimensions line 68;
- ``cps`` step: the same file at commit 54809b5 (``sde_type`` argument), branch ``elif sde_type == 'cps':``
  (lines 70-86 of that version): ``std_dev_t = sigma_prev * sin(noise_level * pi / 2)``, ``pred_original_sample``,
  ``noise_estimate``, ``prev_sample_mean``, ``prev_sample = mean + std_dev_t * noise`` and the constant-free
  ``log_prob = -(prev_sample - mean)^2``, then the same mean;
- the loss: ``scripts/train_sd3.py`` at ac4c86e, lines 881-897 (advantage clamp at ``adv_clip_max``, ``ratio =
  exp(log_prob - old)``, unclipped / clipped surrogate, ``policy_loss = mean(maximum(...))``, the KL
  ``((mean - mean_ref)^2).mean(dim=(1, 2, 3)) / (2 std_dev_t^2)``, ``loss = policy_loss + beta * kl_loss``) and the
  logged ``approx_kl`` (lines 901-903) and ``clipfrac`` (lines 905-910).
The official step takes sigmas from the scheduler table by timestep index; here each sample gets its own table
entries directly (``sigma_max`` = the table's second entry, as line 44). The official code casts to fp32; the
transcription computes in the inputs' dtype so the fp64 comparison is a comparison of formulas.

Engine side: ``kernels.reference.grpo_coefficients`` / ``grpo_step`` / ``grpo_loss`` (fp64 to 1e-10, fp32 to 1e-5)
and the fused path ``kernels.grpo_loss(backend="triton")`` (fp32 to 1e-5), values and gradients w.r.t. v.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import reference
from models.samplers import flow_match_sigmas


# ------------------------------------------------------------------------ the official code, transcribed by hand
def official_step(model_output, sigma, sigma_prev, sigma_max, sample, noise_level, sde_type, prev_sample=None,
                  variance_noise=None):
    """``sde_step_with_logprob`` with per-sample sigmas ``[B]`` -> (prev_sample, log_prob, prev_sample_mean,
    std_dev_t)."""
    view = (-1,) + (1,) * (sample.ndim - 1)
    sigma, sigma_prev = sigma.view(view), sigma_prev.view(view)
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean = (sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
                            + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise
        log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                    - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                    - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=sample.dtype))))
    else:
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output
        noise_estimate = sample + model_output * (1 - sigma)
        prev_sample_mean = (pred_original_sample * (1 - sigma_prev)
                            + noise_estimate * torch.sqrt(sigma_prev ** 2 - std_dev_t ** 2))
        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * variance_noise
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def official_loss(log_prob, old_log_prob, advantages, prev_sample_mean, prev_sample_mean_ref, std_dev_t, *,
                  clip_range, adv_clip_max, beta):
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    dims = tuple(range(1, prev_sample_mean.ndim))
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * std_dev_t ** 2)
    kl_loss = torch.mean(kl_loss)
    loss = policy_loss + beta * kl_loss
    approx_kl = 0.5 * torch.mean((log_prob - old_log_prob) ** 2)
    clipfrac = torch.mean((torch.abs(ratio - 1.0) > clip_range).to(log_prob.dtype))
    return loss, ratio, kl_loss, approx_kl, clipfrac


# ------------------------------------------------------------------------------------------------ the inputs
NOISE = {"sde": 0.7, "cps": 0.8}
SHAPE = (4, 5, 6)  # C, H, W of a latent (D = 120)


def inputs(dtype, sde_type, seed=0):
    """A batch of 7 samples, each at its own step of the SD3 10-step table (step 0 is sigma = 1, the sigma_max
    branch), with a rollout velocity ``v_old``, its sampled ``x_next``, a moved policy velocity ``v`` and a
    reference velocity ``v_ref``; advantages beyond the clip at 5."""
    g = torch.Generator().manual_seed(seed)
    table = flow_match_sigmas(10, shift=3.0).to(dtype)
    steps = torch.tensor([0, 1, 2, 4, 6, 8, 3])
    sigma, sigma_next, sigma_max = table[steps], table[steps + 1], table[1]
    n = steps.numel()
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64).to(dtype)
    v_old = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64).to(dtype)
    xi = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64).to(dtype)
    v = (v_old + 3e-3 * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64).to(dtype))
    v_ref = (v_old + 0.05 * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64).to(dtype))
    adv = torch.tensor([-7.0, -1.3, -0.2, 0.4, 1.1, 2.5, 6.0], dtype=dtype)
    return dict(sigma=sigma, sigma_next=sigma_next, sigma_max=sigma_max, x=x, v_old=v_old, xi=xi, v=v, v_ref=v_ref,
                adv=adv)


def official_all(d, sde_type, clip_range, beta):
    noise = NOISE[sde_type]
    x_next, lp_old, _, _ = official_step(d["v_old"], d["sigma"], d["sigma_next"], d["sigma_max"], d["x"], noise,
                                         sde_type, variance_noise=d["xi"])
    v = d["v"].clone().requires_grad_()
    _, lp, mean, std_dev_t = official_step(v, d["sigma"], d["sigma_next"], d["sigma_max"], d["x"], noise, sde_type,
                                           prev_sample=x_next)
    _, _, mean_ref, _ = official_step(d["v_ref"], d["sigma"], d["sigma_next"], d["sigma_max"], d["x"], noise,
                                      sde_type, prev_sample=x_next)
    loss, ratio, kl, approx_kl, clipfrac = official_loss(lp, lp_old, d["adv"], mean, mean_ref.detach(), std_dev_t,
                                                         clip_range=clip_range, adv_clip_max=5.0, beta=beta)
    loss.backward()
    return dict(x_next=x_next, lp_old=lp_old, lp=lp.detach(), loss=loss.detach(), ratio=ratio.detach(), kl=kl.detach(),
                approx_kl=approx_kl, clipfrac=clipfrac, grad=v.grad)


def engine_all(d, sde_type, clip_range, beta, backend):
    coef = reference.grpo_coefficients(d["sigma"], d["sigma_next"], noise_level=NOISE[sde_type], sde_type=sde_type,
                                       sigma_max=d["sigma_max"])
    if d["x"].dtype == torch.float64:  # grpo_step computes in fp32 as the engine's sampler; here: the formula
        shape = (-1, 1, 1, 1)
        x_next = (coef[:, 0].reshape(shape) * d["x"] + coef[:, 1].reshape(shape) * d["v_old"]
                  + coef[:, 2].reshape(shape) * d["xi"])
    else:
        x_next = reference.grpo_step(d["x"], d["v_old"], coef, d["xi"])
    lp_old = kernels.grpo_logprob(d["v_old"], d["x"], x_next, coef, backend=backend)
    v = d["v"].clone().requires_grad_()
    loss, st = kernels.grpo_loss(v, d["x"], x_next, lp_old, d["adv"], coef, v_ref=d["v_ref"], clip_range=clip_range,
                                 adv_clip=5.0, kl_beta=beta, backend=backend)
    loss.backward()
    return dict(x_next=x_next, lp_old=lp_old, lp=st["log_prob"], loss=loss.detach(), ratio=st["ratio"],
                kl=st["kl"].mean(), approx_kl=st["approx_kl"].mean(), clipfrac=st["clipped"].mean(), grad=v.grad)


# (sde_type, clip_range, kl beta): the official defaults (1e-4 / 0.04; the Fast preset cps 1e-5 / 0) and variants
CASES = [("sde", 1e-4, 0.04), ("sde", 2e-4, 0.04), ("cps", 1e-5, 0.0), ("cps", 1e-4, 0.01)]


@pytest.mark.parametrize("sde_type,clip_range,beta", CASES)
@pytest.mark.parametrize("dtype,backend,tol", [(torch.float64, "torch", 1e-10), (torch.float32, "torch", 1e-5),
                                               (torch.float32, "triton", 1e-5)])
def test_engine_matches_the_official_step_loss_and_gradient(sde_type, clip_range, beta, dtype, backend, tol):
    d = inputs(dtype, sde_type)
    ref = official_all(d, sde_type, clip_range, beta)
    got = engine_all(d, sde_type, clip_range, beta, backend)
    for key in ("x_next", "lp_old", "lp", "loss", "ratio", "kl", "approx_kl", "clipfrac"):
        scale = max(1.0, float(ref[key].detach().abs().max()))
        torch.testing.assert_close(got[key].to(dtype), ref[key].to(dtype), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{key}: {m}")
    gscale = float(ref["grad"].abs().max())
    assert gscale > 0
    torch.testing.assert_close(got["grad"], ref["grad"], rtol=tol, atol=tol * gscale)


@pytest.mark.parametrize("sde_type,clip_range,beta", CASES)
def test_the_inputs_exercise_both_sides_of_the_clip_and_the_kl(sde_type, clip_range, beta):
    """The parity cases can fail: some ratios are clipped, some not, advantages hit the clip at 5, the KL is
    nonzero when on (else the comparisons above would not reach those branches)."""
    ref = official_all(inputs(torch.float64, sde_type), sde_type, clip_range, beta)
    clipped = (ref["ratio"] - 1).abs() > clip_range
    assert bool(clipped.any()) and bool((~clipped).any())
    assert float(ref["kl"]) > 0


def test_sigma_one_uses_the_tables_second_entry_in_the_denominator():
    table = flow_match_sigmas(10, shift=3.0).double()
    coef = reference.grpo_coefficients(table[:1], table[1:2], noise_level=0.7, sde_type="sde", sigma_max=table[1])
    std_dev = math.sqrt(1.0 / (1 - float(table[1]))) * 0.7
    noise = std_dev * math.sqrt(float(table[0] - table[1]))
    assert float(coef[0, reference.GRPO_NOISE]) == pytest.approx(noise, rel=1e-12)
    assert math.isfinite(float(coef[0, reference.GRPO_LP_CONST]))
