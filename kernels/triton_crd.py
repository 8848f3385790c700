"""Fused CRD loss (methods.md section 2 step 5): one forward pass over the five latents, one backward pass for dL/dv.

Forward kernel: per (sample, chunk) it reads ``v, v_old, u, v_pre_cond, v_pre_uncond`` once, forms the CFG anchor
in registers and accumulates five fp32 sums: ``S1v = sum|v - u|``, ``S1o = sum|v_old - u|``, ``S2v = sum (v - u)^2``,
``S2o = sum (v_old - u)^2``, ``Skl = sum (v - v_cfg)^2``. The per-sample values follow from the full-row sums
(``w_th = max(S1v / D, 1e-5)``, ``l = S2o / D / w_old - S2v / D / w_th``, ``kl = Skl / D``), so no second pass.
The tiny per-sample stage (centering, loss, adaptive KL) is the reference's own :func:`crd_per_sample`, under
autograd; it hands ``dL/dl`` and ``dL/dkl`` ([N] each) to the backward kernel, which reads ``v, u, v_pre_cond,
v_pre_uncond`` once and writes ``dL/dv = dL/dl (-(2/D)(v - u) / w_th) + dL/dkl (2/D)(v - v_cfg)`` once — the
formula of methods.md, with ``dL/dl = (2 A_max / N) e`` and ``dL/dkl = c / N``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton_common import launch, partial_buffer, row_sums, rows2d

N_SUMS = 5


@triton.jit(do_not_specialize=["n_chunks"])  # only the partials' address: one compile, not three
def _crd_fwd_kernel(v_ptr, vo_ptr, u_ptr, pc_ptr, pu_ptr, part_ptr, D, n_chunks, cfg_scale,
                    BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    start = chunk * (BLOCK * STEPS)
    s1v = tl.zeros([BLOCK], dtype=tl.float32)
    s1o = tl.zeros([BLOCK], dtype=tl.float32)
    s2v = tl.zeros([BLOCK], dtype=tl.float32)
    s2o = tl.zeros([BLOCK], dtype=tl.float32)
    skl = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vo = tl.load(vo_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        pc = tl.load(pc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        pu = tl.load(pu_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dv = v - u
        do = vo - u
        dk = v - (pu + cfg_scale * (pc - pu))  # CFG combine of the anchor, in registers
        s1v += tl.abs(dv)
        s1o += tl.abs(do)
        s2v += dv * dv
        s2o += do * do
        skl += dk * dk
    out = part_ptr + (row * n_chunks + chunk) * 5
    tl.store(out + 0, tl.sum(s1v, axis=0))
    tl.store(out + 1, tl.sum(s1o, axis=0))
    tl.store(out + 2, tl.sum(s2v, axis=0))
    tl.store(out + 3, tl.sum(s2o, axis=0))
    tl.store(out + 4, tl.sum(skl, axis=0))


@triton.jit
def _crd_bwd_kernel(v_ptr, u_ptr, pc_ptr, pu_ptr, coef_l_ptr, coef_kl_ptr, dv_ptr, D, cfg_scale,
                    BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    start = chunk * (BLOCK * STEPS)
    a = tl.load(coef_l_ptr + row)   # dL/dl * (-2 / (D w_th))
    b = tl.load(coef_kl_ptr + row)  # dL/dkl * (2 / D)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        pc = tl.load(pc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        pu = tl.load(pu_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dv = a * (v - u) + b * (v - (pu + cfg_scale * (pc - pu)))
        tl.store(dv_ptr + base + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


class _CRDSums(torch.autograd.Function):
    """``v -> (l, kl)`` per sample, with ``w_th``/``w_old`` as non-differentiable outputs."""

    @staticmethod
    def forward(ctx, v, v_old, u, v_pre_cond, v_pre_uncond, cfg_scale, block, steps, ratio_weight):
        v2, vo2, u2, pc2, pu2 = (rows2d(t) for t in (v, v_old, u, v_pre_cond, v_pre_uncond))
        n, d = v2.shape
        geo = launch(n, d, block=block, steps=steps)
        part = partial_buffer(n, geo, N_SUMS, v.device)
        _crd_fwd_kernel[(n, geo.chunks)](v2, vo2, u2, pc2, pu2, part, d, geo.chunks, float(cfg_scale),
                                         BLOCK=geo.block, STEPS=geo.steps, num_warps=geo.num_warps)
        s1v, s1o, s2v, s2o, skl = row_sums(part).unbind(1)
        if ratio_weight is None:  # the adaptive weights
            w_th = (s1v / d).clamp_min(reference.WEIGHT_FLOOR)
            w_old = (s1o / d).clamp_min(reference.WEIGHT_FLOOR)
        else:  # a fixed per-sample weight (the ELBO's): the backward uses it exactly as w_th
            w_th = w_old = ratio_weight.reshape(-1).float().contiguous()
        log_ratio = (s2o / d) / w_old - (s2v / d) / w_th
        kl = skl / d
        ctx.save_for_backward(v2, u2, pc2, pu2, w_th)
        ctx.meta = (v.shape, v.dtype, float(cfg_scale), geo)
        ctx.mark_non_differentiable(w_th, w_old)
        return log_ratio, kl, w_th, w_old

    @staticmethod
    def backward(ctx, g_l, g_kl, _g_wth, _g_wold):
        v2, u2, pc2, pu2, w_th = ctx.saved_tensors
        shape, dtype, cfg_scale, geo = ctx.meta
        n, d = v2.shape
        zeros = torch.zeros(n, dtype=torch.float32, device=v2.device)
        g_l = zeros if g_l is None else g_l.float()
        g_kl = zeros if g_kl is None else g_kl.float()
        coef_l = (g_l * (-2.0 / d) / w_th).contiguous()
        coef_kl = (g_kl * (2.0 / d)).contiguous()
        dv = torch.empty((n, d), dtype=dtype, device=v2.device)
        _crd_bwd_kernel[(n, geo.chunks)](v2, u2, pc2, pu2, coef_l, coef_kl, dv, d, cfg_scale,
                                         BLOCK=geo.block, STEPS=geo.steps, num_warps=geo.num_warps)
        return dv.reshape(shape), None, None, None, None, None, None, None, None


def crd_loss(v, v_old, u, v_pre_cond, v_pre_uncond, r01, rho, group_ids, *, beta=1.0, adv_clip=5.0,
             cfg_scale=4.5, kl_beta=0.1, kl_min=1e-4, centering="group", group_mean_fn=None, ratio_weight=None,
             block=None, steps=None):
    """Fused CRD loss; same contract as :func:`kernels.reference.crd_loss` (``block``/``steps`` force a geometry)."""
    log_ratio, kl, w_th, w_old = _CRDSums.apply(v, v_old.detach(), u.detach(), v_pre_cond.detach(),
                                                v_pre_uncond.detach(), cfg_scale, block, steps,
                                                None if ratio_weight is None else ratio_weight.detach())
    loss, stats = reference.crd_per_sample(log_ratio, kl, r01.reshape(-1).float().detach(),
                                           rho.reshape(-1).float().detach(), group_ids, beta=beta,
                                           adv_clip=adv_clip, kl_beta=kl_beta, kl_min=kl_min, centering=centering,
                                           group_mean_fn=group_mean_fn)
    stats.update(log_ratio=log_ratio.detach(), kl=kl.detach(), w_th=w_th, w_old=w_old)
    return loss, stats


def aot_exercise(rows, d, dtype, device):
    """Every launch of this module once at ``[rows, d]`` in ``dtype``, forward and backward (the hook of
    :mod:`kernels.aot`, which passes meta tensors and records the launches instead of running them)."""
    v, v_old, u, pc, pu = (torch.empty(rows, d, dtype=dtype, device=device) for _ in range(5))
    log_ratio, kl, _, _ = _CRDSums.apply(v.requires_grad_(), v_old, u, pc, pu, 4.5, None, None, None)
    (log_ratio.sum() + kl.sum()).backward()
