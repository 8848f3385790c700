"""Fused Flow-GRPO step loss (methods.md section 7): one forward pass for the per-sample sums, one backward pass.

Forward kernel: per (sample, chunk) it reads ``v``, ``x_t``, ``x_next`` (and ``v_ref`` when the KL is on) once,
with the sample's ``a``, ``b`` from the coefficient table, and accumulates in fp32 ``sum (x_next - a x_t - b v)^2``
and ``sum (v - v_ref)^2``. Per sample (torch, ``[N]`` vectors, the reference's own functions):
``lp = -inv2var S1 / D + lp_const``, ``kl = kl_scale b^2 S2 / D``, then :func:`reference.grpo_per_sample` (ratio,
clipped surrogate, clip flags) under autograd. Backward kernel: the mean is affine in v, so
``dL/dv = g_lp (2 b inv2var / D)(x_next - mean) + g_kl (2 kl_scale b^2 / D)(v - v_ref)``, reading the inputs once and
writing ``dv`` once.

The launch geometry depends on D only (never on the number of rows), so the rollout's log-prob (one call per
sampler chunk) and the training forward's (one per micro-batch) sum in the same order: bit-identical inputs give a
ratio of exactly 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.reference import GRPO_B, GRPO_KL_SCALE
from kernels.triton_common import launch, partial_buffer, row_sums, rows2d

@triton.jit(do_not_specialize=["n_chunks"])  # n_chunks only addresses the partials: one compile, not three
def _grpo_fwd_kernel(v_ptr, vr_ptr, xt_ptr, xn_ptr, coef_ptr, part_ptr, D, n_chunks, HAS_REF: tl.constexpr,
                     BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    start = chunk * (BLOCK * STEPS)
    a = tl.load(coef_ptr + row * 6 + 0)
    b = tl.load(coef_ptr + row * 6 + 1)
    s_lp = tl.zeros([BLOCK], dtype=tl.float32)
    s_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d = xn - (a * xt + b * v)
        s_lp += d * d
        if HAS_REF:
            vr = tl.load(vr_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            dk = v - vr
            s_kl += dk * dk
    out = part_ptr + (row * n_chunks + chunk) * 2
    tl.store(out + 0, tl.sum(s_lp, axis=0))
    tl.store(out + 1, tl.sum(s_kl, axis=0))


@triton.jit
def _grpo_bwd_kernel(v_ptr, vr_ptr, xt_ptr, xn_ptr, coef_ptr, g_ptr, dv_ptr, D, HAS_REF: tl.constexpr,
                     BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    start = chunk * (BLOCK * STEPS)
    a = tl.load(coef_ptr + row * 6 + 0)
    b = tl.load(coef_ptr + row * 6 + 1)
    c_lp = tl.load(g_ptr + row * 2 + 0)  # g_lp * 2 b inv2var / D
    c_kl = tl.load(g_ptr + row * 2 + 1)  # g_kl * 2 kl_scale b^2 / D
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dv = c_lp * (xn - (a * xt + b * v))
        if HAS_REF:
            vr = tl.load(vr_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            dv += c_kl * (v - vr)
        tl.store(dv_ptr + base + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _geometry(d: int, block, steps):
    # one row's geometry for every call: the summation order never depends on how many rows a call has
    return launch(1, d, block=block, steps=steps)


class _GRPOSums(torch.autograd.Function):
    """``v -> (S1 / D, S2 / D)`` per sample: ``mean_pix (x_next - mean)^2`` and ``mean_pix (v - v_ref)^2``."""

    @staticmethod
    def forward(ctx, v, v_ref, x_t, x_next, coef, block, steps):
        v2, xt2, xn2 = rows2d(v), rows2d(x_t), rows2d(x_next)
        vr2 = rows2d(v_ref) if v_ref is not None else v2
        n, d = v2.shape
        geo = _geometry(d, block, steps)
        part = partial_buffer(n, geo, 2, v.device)
        _grpo_fwd_kernel[(n, geo.chunks)](v2, vr2, xt2, xn2, coef, part, d, geo.chunks, HAS_REF=v_ref is not None,
                                          BLOCK=geo.block, STEPS=geo.steps, num_warps=geo.num_warps)
        s_lp, s_kl = row_sums(part).unbind(1)
        ctx.save_for_backward(v2, vr2, xt2, xn2, coef)
        ctx.meta = (v.shape, v.dtype, geo, v_ref is not None)
        return s_lp / d, s_kl / d

    @staticmethod
    def backward(ctx, g_lp, g_kl):
        v2, vr2, xt2, xn2, coef = ctx.saved_tensors
        shape, dtype, geo, has_ref = ctx.meta
        n, d = v2.shape
        zeros = torch.zeros(n, dtype=torch.float32, device=v2.device)
        g_lp = zeros if g_lp is None else g_lp.float()
        g_kl = zeros if g_kl is None else g_kl.float()
        b = coef[:, GRPO_B]
        # d(S1/D)/dv = -(2/D) b (x_next - mean); d(S2/D)/dv = (2/D)(v - v_ref)
        g = torch.stack([g_lp * (-2.0 / d) * b, g_kl * (2.0 / d)], dim=1).contiguous()
        dv = torch.empty((n, d), dtype=dtype, device=v2.device)
        _grpo_bwd_kernel[(n, geo.chunks)](v2, vr2, xt2, xn2, coef, g, dv, d, HAS_REF=has_ref, BLOCK=geo.block,
                                          STEPS=geo.steps, num_warps=geo.num_warps)
        return dv.reshape(shape), None, None, None, None, None, None


def _coef32(coef: torch.Tensor) -> torch.Tensor:
    return coef.detach().to(torch.float32).contiguous()


def grpo_logprob(v, x_t, x_next, coef, *, block=None, steps=None):
    """Fused per-sample log-prob; same contract as :func:`kernels.reference.grpo_logprob`."""
    c = _coef32(coef)
    sq, _ = _GRPOSums.apply(v, None, x_t.detach(), x_next.detach(), c, block, steps)
    return reference.grpo_logprob_from_sums(sq, c)


def grpo_loss(v, x_t, x_next, lp_old, adv, coef, *, v_ref=None, clip_range=1e-4, adv_clip=5.0, kl_beta=0.04,
              block=None, steps=None):
    """Fused Flow-GRPO loss; same contract as :func:`kernels.reference.grpo_loss`."""
    c = _coef32(coef)
    sq, kl_sq = _GRPOSums.apply(v, None if v_ref is None else v_ref.detach(), x_t.detach(), x_next.detach(), c,
                                block, steps)
    lp = reference.grpo_logprob_from_sums(sq, c)
    kl = None
    if v_ref is not None:
        kl = c[:, GRPO_KL_SCALE] * c[:, GRPO_B].square() * kl_sq
    loss, stats = reference.grpo_per_sample(lp, lp_old.float(), adv.float(), kl, clip_range=clip_range,
                                            adv_clip=adv_clip, kl_beta=kl_beta)
    stats["log_prob"] = lp.detach()
    return loss, stats



def aot_exercise(rows, d, dtype, device):
    """Every launch of this module once at ``[rows, d]`` in ``dtype``, with and without the KL reference, forward and
    backward (the hook of :mod:`kernels.aot`, which passes meta tensors and records the launches instead of
    running them)."""
    v, v_ref, x_t, x_next = (torch.empty(rows, d, dtype=dtype, device=device) for _ in range(4))
    coef = torch.empty(rows, 6, dtype=torch.float32, device=device)
    for ref in (None, v_ref):
        sq, kl_sq = _GRPOSums.apply(v.detach().requires_grad_(), ref, x_t, x_next, coef, None, None)
        (sq.sum() + kl_sq.sum()).backward()
