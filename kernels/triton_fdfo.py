"""Fused FDFO kernels (methods.md section 4): the finite-difference pairs and the SPO surrogate loss.

``fdfo_pairs``: per (pair, chunk) a reduction kernel reads both branches once and sums ``dx^2`` with
``dx = (x_a - x_b) / 2``; after the per-pair ``mean_pix(dx^2) + 1e-6``, a second kernel writes both rows of
``dxh`` (``dxh_b = -dxh_a``). The normalisation needs the full-row mean square before any element can be written
and Triton has no grid-wide barrier, so the [2P, D] input is read twice (an epoch-level op, tiny next to rollout).

``fdfo_loss``: per (item, chunk) the forward kernel reads ``v``, ``v_ref`` and the item's branch row of ``dxh``
(through ``item_index``: no per-step copy) once and sums ``((v - v_ref) + dxh)^2`` and ``dxh^2`` in the same order,
so ``v == v_ref`` gives bit-identical sums and a ratio of exactly 1. The reference's :func:`fdfo_per_item` forms the
SPO surrogate under autograd; the backward kernel writes ``dL/dv = dL/dell (-(2/D)((v - v_ref) + dxh))``, with
``dL/dell = (dL/drho) rho / M`` — the formula of methods.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton_common import launch, partial_buffer, row_sums, rows2d


@triton.jit(do_not_specialize=["n_chunks"])  # only the partials' address: one compile, not three
def _pairs_sumsq_kernel(x_ptr, part_ptr, D, n_chunks, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base_a = (2 * pair) * D
    start = chunk * (BLOCK * STEPS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        xa = tl.load(x_ptr + base_a + offs, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + base_a + D + offs, mask=mask, other=0.0).to(tl.float32)
        dx = (xa - xb) / 2
        acc += dx * dx
    tl.store(part_ptr + pair * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _pairs_write_kernel(x_ptr, denom_ptr, dxh_ptr, D, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base_a = (2 * pair) * D
    start = chunk * (BLOCK * STEPS)
    denom = tl.load(denom_ptr + pair)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        xa = tl.load(x_ptr + base_a + offs, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + base_a + D + offs, mask=mask, other=0.0).to(tl.float32)
        dxh = ((xa - xb) / 2) / denom
        tl.store(dxh_ptr + base_a + offs, dxh, mask=mask)
        tl.store(dxh_ptr + base_a + D + offs, -dxh, mask=mask)


def fdfo_pairs(x_final, rewards, *, block=None, steps=None):
    """Fused finite-difference pairs; same contract as :func:`kernels.reference.fdfo_pairs`."""
    x2 = rows2d(x_final.detach())
    n, d = x2.shape
    pairs = n // 2
    geo = launch(pairs, d, block=block, steps=steps)
    part = partial_buffer(pairs, geo, 1, x2.device)
    _pairs_sumsq_kernel[(pairs, geo.chunks)](x2, part, d, geo.chunks, BLOCK=geo.block, STEPS=geo.steps,
                                             num_warps=geo.num_warps)
    denom = (row_sums(part)[:, 0] / d + reference.FDFO_EPS).contiguous()
    dxh = torch.empty((n, d), dtype=torch.float32, device=x2.device)
    _pairs_write_kernel[(pairs, geo.chunks)](x2, denom, dxh, d, BLOCK=geo.block, STEPS=geo.steps,
                                             num_warps=geo.num_warps)
    r = rewards.detach().reshape(-1).float()
    partner = torch.arange(n, device=r.device) ^ 1
    return (r - r[partner]) / 2, dxh.reshape(x_final.shape)


@triton.jit(do_not_specialize=["n_chunks"])  # only the partials' address: one compile, not three
def _fdfo_fwd_kernel(v_ptr, vr_ptr, dxh_ptr, idx_ptr, part_ptr, D, n_chunks, BLOCK: tl.constexpr,
                     STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    base_d = tl.load(idx_ptr + row).to(tl.int64) * D  # the item's branch row in dxh
    start = chunk * (BLOCK * STEPS)
    s_item = tl.zeros([BLOCK], dtype=tl.float32)
    s_ref = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vr = tl.load(vr_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dxh_ptr + base_d + offs, mask=mask, other=0.0).to(tl.float32)
        diff = (v - vr) + dh  # v - v*, with v* = v_ref - dxh; exactly dh when v == v_ref
        s_item += diff * diff
        s_ref += dh * dh
    out = part_ptr + (row * n_chunks + chunk) * 2
    tl.store(out + 0, tl.sum(s_item, axis=0))
    tl.store(out + 1, tl.sum(s_ref, axis=0))


@triton.jit
def _fdfo_bwd_kernel(v_ptr, vr_ptr, dxh_ptr, idx_ptr, coef_ptr, dv_ptr, D, BLOCK: tl.constexpr,
                     STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = row * D
    base_d = tl.load(idx_ptr + row).to(tl.int64) * D
    start = chunk * (BLOCK * STEPS)
    a = tl.load(coef_ptr + row)  # dL/dell * (-2/D)
    for k in range(STEPS):
        offs = start + k * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        vr = tl.load(vr_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dxh_ptr + base_d + offs, mask=mask, other=0.0).to(tl.float32)
        dv = a * ((v - vr) + dh)
        tl.store(dv_ptr + base + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


class _FDFOSums(torch.autograd.Function):
    """``v -> ell`` per item, with ``ell_ref`` as a non-differentiable output."""

    @staticmethod
    def forward(ctx, v, v_ref, dxh, index, block, steps):
        v2, vr2, d2 = rows2d(v), rows2d(v_ref), rows2d(dxh)
        m, d = v2.shape
        geo = launch(m, d, block=block, steps=steps)
        part = partial_buffer(m, geo, 2, v.device)
        _fdfo_fwd_kernel[(m, geo.chunks)](v2, vr2, d2, index, part, d, geo.chunks, BLOCK=geo.block,
                                          STEPS=geo.steps, num_warps=geo.num_warps)
        s_item, s_ref = row_sums(part).unbind(1)
        ctx.save_for_backward(v2, vr2, d2, index)
        ctx.meta = (v.shape, v.dtype, geo)
        ell_ref = -(s_ref / d)
        ctx.mark_non_differentiable(ell_ref)
        return -(s_item / d), ell_ref

    @staticmethod
    def backward(ctx, g_ell, _g_ref):
        v2, vr2, d2, index = ctx.saved_tensors
        shape, dtype, geo = ctx.meta
        m, d = v2.shape
        if g_ell is None:
            g_ell = torch.zeros(m, dtype=torch.float32, device=v2.device)
        coef = (g_ell.float() * (-2.0 / d)).contiguous()
        dv = torch.empty((m, d), dtype=dtype, device=v2.device)
        _fdfo_bwd_kernel[(m, geo.chunks)](v2, vr2, d2, index, coef, dv, d, BLOCK=geo.block, STEPS=geo.steps,
                                          num_warps=geo.num_warps)
        return dv.reshape(shape), None, None, None, None, None


def fdfo_loss(v, v_ref, dxh, dR, *, clip=0.03, item_index=None, block=None, steps=None):
    """Fused FDFO SPO surrogate; same contract as :func:`kernels.reference.fdfo_loss`."""
    m = v.shape[0]
    index = torch.arange(m, device=v.device) if item_index is None else item_index.reshape(-1)
    index = index.to(torch.int64).contiguous()
    ell, ell_ref = _FDFOSums.apply(v, v_ref.detach(), dxh.detach(), index, block, steps)
    dr = dR.detach().reshape(-1).float()[index]
    loss, rho = reference.fdfo_per_item(ell, ell_ref, dr, clip=clip)
    return loss, {"ratio": rho.detach(), "log_ratio": (ell - ell_ref).detach()}


def aot_exercise(rows, d, dtype, device):
    """Every launch of this module once at ``[rows, d]`` in ``dtype`` (``rows`` pairs, then ``rows`` items), forward
    and backward (the hook of :mod:`kernels.aot`, which passes meta tensors and records the launches instead of
    running them). ``dxh`` is fp32, as :func:`fdfo_pairs` makes it."""
    x_final = torch.empty(2 * rows, d, dtype=dtype, device=device)
    _, dxh = fdfo_pairs(x_final, torch.empty(2 * rows, device=device))
    v, v_ref = (torch.empty(rows, d, dtype=dtype, device=device) for _ in range(2))
    index = torch.arange(rows, device=device)
    ell, _ = _FDFOSums.apply(v.requires_grad_(), v_ref, dxh, index, None, None)
    ell.sum().backward()
