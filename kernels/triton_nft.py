"""Fused DiffusionNFT loss (methods.md section 3): one forward pass for the per-sample sums, one backward pass.

Forward kernel: per (sample, chunk) it reads ``v, v_old, v_pre, x_t, x0`` once and accumulates in fp32
``sum|e_pos|``, ``sum e_pos^2``, ``sum|e_neg|``, ``sum e_neg^2``, ``sum (v - v_pre)^2`` with
``e_pos = x_t - sigma (beta v + (1 - beta) v_old) - x0`` and ``e_neg = x_t - sigma ((1 + beta) v_old - beta v) - x0``.
Per sample: ``w = max(S1 / D, 1e-5)`` (stop-gradient), ``L_pos = S2_pos / D / w_pos``, same for neg,
``kl = Skl / D``; the reference's :func:`nft_per_sample` forms the loss under autograd. Backward kernel:
``dL/dv = dL/dL_pos (2/D) e_pos (-sigma beta) / w_pos + dL/dL_neg (2/D) e_neg (sigma beta) / w_neg
+ dL/dkl (2/D)(v - v_pre)``, reading the five inputs once and writing ``dv`` once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton_common import launch, partial_buffer, row_sums, rows2d

N_SUMS = 5


@triton.jit(do_not_specialize=["n_chunks"])  # only the partials' address: one compile, not three
def _nft_fwd_kernel(v_ptr, vo_ptr, vp_ptr, xt_ptr, x0_ptr, sigma_ptr, part_ptr, D, n_chunks, beta,
                    BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    start = chunk * (BLOCK * STEPS)
    sigma = tl.load(sigma_ptr + row)
    s1p = tl.zeros([BLOCK], dtype=tl.float32)
    s2p = tl.zeros([BLOCK], dtype=tl.float32)
    s1n = tl.zeros([BLOCK], dtype=tl.float32)
    s2n = tl.zeros([BLOCK], dtype=tl.float32)
    skl = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vo = tl.load(vo_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vp = tl.load(vp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        e_pos = (xt - sigma * (beta * v + (1.0 - beta) * vo)) - x0
        e_neg = (xt - sigma * ((1.0 + beta) * vo - beta * v)) - x0
        dk = v - vp
        s1p += tl.abs(e_pos)
        s2p += e_pos * e_pos
        s1n += tl.abs(e_neg)
        s2n += e_neg * e_neg
        skl += dk * dk
    out = part_ptr + (row * n_chunks + chunk) * 5
    tl.store(out + 0, tl.sum(s1p, axis=0))
    tl.store(out + 1, tl.sum(s2p, axis=0))
    tl.store(out + 2, tl.sum(s1n, axis=0))
    tl.store(out + 3, tl.sum(s2n, axis=0))
    tl.store(out + 4, tl.sum(skl, axis=0))


@triton.jit
def _nft_bwd_kernel(v_ptr, vo_ptr, vp_ptr, xt_ptr, x0_ptr, sigma_ptr, coef_ptr, dv_ptr, D, beta,
                    BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    start = chunk * (BLOCK * STEPS)
    sigma = tl.load(sigma_ptr + row)
    a_pos = tl.load(coef_ptr + row * 3 + 0)  # dL/dL_pos * (2/D) * (-sigma beta) / w_pos
    a_neg = tl.load(coef_ptr + row * 3 + 1)  # dL/dL_neg * (2/D) * (sigma beta) / w_neg
    a_kl = tl.load(coef_ptr + row * 3 + 2)   # dL/dkl * (2/D)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vo = tl.load(vo_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vp = tl.load(vp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        e_pos = (xt - sigma * (beta * v + (1.0 - beta) * vo)) - x0
        e_neg = (xt - sigma * ((1.0 + beta) * vo - beta * v)) - x0
        dv = a_pos * e_pos + a_neg * e_neg + a_kl * (v - vp)
        tl.store(dv_ptr + base + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


class _NFTSums(torch.autograd.Function):
    """``v -> (L_pos, L_neg, kl)`` per sample, with ``w_pos``/``w_neg`` as non-differentiable outputs."""

    @staticmethod
    def forward(ctx, v, v_old, v_pre, x_t, x0, sigma, beta, block, steps):
        v2, vo2, vp2, xt2, x02 = (rows2d(t) for t in (v, v_old, v_pre, x_t, x0))
        n, d = v2.shape
        sig = sigma.float().reshape(-1).expand(n).contiguous()
        geo = launch(n, d, block=block, steps=steps)
        part = partial_buffer(n, geo, N_SUMS, v.device)
        _nft_fwd_kernel[(n, geo.chunks)](v2, vo2, vp2, xt2, x02, sig, part, d, geo.chunks, float(beta),
                                         BLOCK=geo.block, STEPS=geo.steps, num_warps=geo.num_warps)
        s1p, s2p, s1n, s2n, skl = row_sums(part).unbind(1)
        w_pos = (s1p / d).clamp_min(reference.WEIGHT_FLOOR)
        w_neg = (s1n / d).clamp_min(reference.WEIGHT_FLOOR)
        ctx.save_for_backward(v2, vo2, vp2, xt2, x02, sig, w_pos, w_neg)
        ctx.meta = (v.shape, v.dtype, float(beta), geo)
        ctx.mark_non_differentiable(w_pos, w_neg)
        return (s2p / d) / w_pos, (s2n / d) / w_neg, skl / d, w_pos, w_neg

    @staticmethod
    def backward(ctx, g_pos, g_neg, g_kl, _g_wp, _g_wn):
        v2, vo2, vp2, xt2, x02, sig, w_pos, w_neg = ctx.saved_tensors
        shape, dtype, beta, geo = ctx.meta
        n, d = v2.shape
        zeros = torch.zeros(n, dtype=torch.float32, device=v2.device)
        g_pos, g_neg, g_kl = (zeros if g is None else g.float() for g in (g_pos, g_neg, g_kl))
        coef = torch.stack([g_pos * (2.0 / d) * (-sig * beta) / w_pos,
                            g_neg * (2.0 / d) * (sig * beta) / w_neg,
                            g_kl * (2.0 / d)], dim=1).contiguous()
        dv = torch.empty((n, d), dtype=dtype, device=v2.device)
        _nft_bwd_kernel[(n, geo.chunks)](v2, vo2, vp2, xt2, x02, sig, coef, dv, d, beta,
                                         BLOCK=geo.block, STEPS=geo.steps, num_warps=geo.num_warps)
        return dv.reshape(shape), None, None, None, None, None, None, None, None


def nft_loss(v, v_old, v_pre, x_t, x0, sigma, r01, *, beta=1.0, adv_clip=5.0, kl_beta=1e-4, block=None,
             steps=None):
    """Fused NFT loss; same contract as :func:`kernels.reference.nft_loss` (``block``/``steps`` force a geometry)."""
    l_pos, l_neg, kl, w_pos, w_neg = _NFTSums.apply(v, v_old.detach(), v_pre.detach(), x_t.detach(), x0.detach(),
                                                    sigma.detach(), beta, block, steps)
    loss = reference.nft_per_sample(l_pos, l_neg, kl, r01.reshape(-1).float().detach(), beta=beta,
                                    adv_clip=adv_clip, kl_beta=kl_beta)
    stats = {"l_pos": l_pos.detach(), "l_neg": l_neg.detach(), "w_pos": w_pos, "w_neg": w_neg, "kl": kl.detach()}
    return loss, stats


def aot_exercise(rows, d, dtype, device):
    """Every launch of this module once at ``[rows, d]`` in ``dtype``, forward and backward (the hook of
    :mod:`kernels.aot`, which passes meta tensors and records the launches instead of running them)."""
    v, v_old, v_pre, x_t, x0 = (torch.empty(rows, d, dtype=dtype, device=device) for _ in range(5))
    sigma = torch.empty(rows, dtype=torch.float32, device=device)
    l_pos, l_neg, kl, _, _ = _NFTSums.apply(v.requires_grad_(), v_old, v_pre, x_t, x0, sigma, 1.0, None, None)
    (l_pos.sum() + l_neg.sum() + kl.sum()).backward()
