"""Fused kernels of the engine: grouped advantages, the CRD, NFT, FDFO and Flow-GRPO losses, and FDFO's pairs.

Every public function here is autograd-aware (only ``v`` receives a gradient), validates its inputs (one clear
``ValueError`` sentence), and dispatches on ``backend``:

- ``"auto"`` (default): the fused Triton kernels on CUDA tensors; the same kernels through the Triton interpreter on
  CPU when ``TRITON_INTERPRET=1`` (CPU CI); the torch reference otherwise (and always for fp64 inputs);
- ``"triton"``: the fused kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"torch"``: :mod:`kernels.reference`, the readable spec in code.

``group_advantages`` works on ``[N]`` vectors only; it is the same torch code on every backend (a kernel launch
would cost more than the work).

The math is ``shared/spec/methods.md`` sections 1-4 and 7; see :mod:`kernels.reference` for the formulas.
"""
from __future__ import annotations

import torch

from kernels import reference, validate
from kernels.dispatch import resolve_backend, triton_module

__all__ = ["group_advantages", "crd_loss", "nft_loss", "fdfo_pairs", "fdfo_loss", "grpo_logprob", "grpo_loss",
           "resolve_backend", "reference"]


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool = True,
                     adv_clip: float = 5.0, std_floor: str = "max", backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Grouped reward centering (methods.md section 1) -> ``(adv, r01, stats)``.

    ``rewards`` ``[N]`` (finite; checked, one host sync per call: call it once per epoch), ``group_ids`` ``[N]``
    arbitrary integers. ``std_floor``: ``"max"`` divides by ``max(std, 1e-6)``, ``"additive"`` by ``std + 1e-4``
    (the official DiffusionNFT trainer). A group whose rewards are all equal (e.g. a one-member group) gets
    advantage 0 exactly and ``r01 = 0.5``, with per-group or global std. ``stats["zero_std_fraction"]`` is a 0-d
    tensor.
    """
    validate.group_advantages(rewards, group_ids, adv_clip, std_floor)
    resolve_backend(backend, rewards)  # validates the name; the [N]-sized math is torch on every backend
    return reference.group_advantages(rewards, group_ids, global_std=global_std, adv_clip=adv_clip,
                                      std_floor=std_floor)


def crd_loss(v: torch.Tensor, v_old: torch.Tensor, u: torch.Tensor, v_pre_cond: torch.Tensor,
             v_pre_uncond: torch.Tensor, r01: torch.Tensor, rho: torch.Tensor, group_ids: torch.Tensor, *,
             beta: float = 1.0, adv_clip: float = 5.0, cfg_scale: float = 4.5, kl_beta: float = 0.1,
             kl_min: float = 1e-4, centering: str = "group", group_mean_fn: reference.GroupMeanFn | None = None,
             ratio_weight: torch.Tensor | None = None, backend: str = "auto"
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CRD loss of one micro-batch at one timestep (methods.md section 2 step 5) -> ``(loss, stats)``.

    Latents ``v`` (with grad), ``v_old``, ``u = eps - x0``, ``v_pre_cond``, ``v_pre_uncond``: ``[N, ...]`` fp32 or
    bf16. ``r01`` ``[N]`` (from :func:`group_advantages`), ``rho`` ``[N]`` the adaptive-KL signal in [0, 1],
    ``group_ids`` ``[N]`` integers. ``centering``: ``"group"`` (exact per prompt) or ``"batch"`` (micro-batch mean).
    ``group_mean_fn(values [N, k], group_ids) -> [N, k]``: per-sample group means of detached scalars; the default
    uses this micro-batch only, a distributed caller passes one that gathers across ranks (groups split over ranks).
    ``ratio_weight`` ``[N]`` (positive; None = the adaptive weights ``mean_pix|v - u|``, ``mean_pix|v_old - u|``)
    replaces ``w_th`` and ``w_old`` by one fixed weight per sample (the ELBO weighting of ``crd.log_ratio: elbo``).
    The fused path reads the five latents once forward and ``v, u, v_pre_*`` once backward, writing ``dL/dv``.
    Stats (per sample): ``log_ratio``, ``kl``, ``w_th``, ``w_old``, ``kl_coef``, ``lc``, ``rc``, ``e``; 0-d:
    ``loss_crd``, ``loss_kl``.
    """
    validate.crd_loss(v, v_old, u, v_pre_cond, v_pre_uncond, r01, rho, group_ids, beta, adv_clip, kl_beta, kl_min,
                      centering, ratio_weight)
    kwargs = dict(beta=beta, adv_clip=adv_clip, cfg_scale=cfg_scale, kl_beta=kl_beta, kl_min=kl_min,
                  centering=centering, group_mean_fn=group_mean_fn, ratio_weight=ratio_weight)
    if resolve_backend(backend, v, v_old, u, v_pre_cond, v_pre_uncond) == "torch":
        return reference.crd_loss(v, v_old, u, v_pre_cond, v_pre_uncond, r01, rho, group_ids, **kwargs)
    return triton_module("crd").crd_loss(v, v_old, u, v_pre_cond, v_pre_uncond, r01, rho, group_ids, **kwargs)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, v_pre: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
             sigma: torch.Tensor, r01: torch.Tensor, *, beta: float = 1.0, adv_clip: float = 5.0,
             kl_beta: float = 1e-4, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss (methods.md section 3) -> ``(loss, stats)``; ``beta`` is ``beta_nft``.

    Latents ``[N, ...]`` fp32 or bf16; ``sigma`` ``[N]`` or 0-d; ``r01`` ``[N]``. Stats (per sample): ``l_pos``,
    ``l_neg``, ``w_pos``, ``w_neg``, ``kl``.
    """
    validate.nft_loss(v, v_old, v_pre, x_t, x0, sigma, r01, beta, adv_clip)
    kwargs = dict(beta=beta, adv_clip=adv_clip, kl_beta=kl_beta)
    if resolve_backend(backend, v, v_old, v_pre, x_t, x0) == "torch":
        return reference.nft_loss(v, v_old, v_pre, x_t, x0, sigma, r01, **kwargs)
    return triton_module("nft").nft_loss(v, v_old, v_pre, x_t, x0, sigma, r01, **kwargs)


def fdfo_pairs(x_final: torch.Tensor, rewards: torch.Tensor, *, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """FDFO finite-difference pairs (methods.md section 4 step 3) -> ``(dR [2P], dxh like x_final, fp32)``.

    Rows ``2p`` and ``2p + 1`` are one pair's branches; results are per row (per branch). ``rewards`` must be finite
    (checked, one host sync: call once per epoch).
    """
    validate.fdfo_pairs(x_final, rewards)
    if resolve_backend(backend, x_final) == "torch":
        return reference.fdfo_pairs(x_final, rewards)
    return triton_module("fdfo").fdfo_pairs(x_final, rewards)


def fdfo_loss(v: torch.Tensor, v_ref: torch.Tensor, dxh: torch.Tensor, dR: torch.Tensor, *, clip: float = 0.03,
              item_index: torch.Tensor | None = None, backend: str = "auto"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FDFO SPO surrogate (methods.md section 4 step 5) -> ``(loss, stats)``; stats: per-item ``ratio``, ``log_ratio``.

    ``v``, ``v_ref`` ``[M, ...]`` items; ``dxh`` ``[B, ...]``, ``dR`` ``[B]`` per branch; ``item_index`` ``[M]``
    maps items to branch rows (no per-step copy of ``dxh``); ``None`` means ``B == M``, row i for item i.
    Indices must lie in ``[0, B)`` (checked on CPU tensors; on CUDA unchecked, to avoid a host sync).
    """
    validate.fdfo_loss(v, v_ref, dxh, dR, clip, item_index)
    if resolve_backend(backend, v, v_ref, dxh) == "torch":
        return reference.fdfo_loss(v, v_ref, dxh, dR, clip=clip, item_index=item_index)
    return triton_module("fdfo").fdfo_loss(v, v_ref, dxh, dR, clip=clip, item_index=item_index)


def grpo_logprob(v: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor, coef: torch.Tensor, *,
                 backend: str = "auto") -> torch.Tensor:
    """Flow-GRPO per-sample transition log-prob ``[N]`` (methods.md section 7; what the rollout stores as
    ``lp_old``). ``coef`` ``[N, 6]`` from :func:`kernels.reference.grpo_coefficients`. The same sums as
    :func:`grpo_loss` on the same backend, so identical inputs give a ratio of exactly 1."""
    validate.grpo_loss(v, x_t, x_next, None, None, coef, None, 1.0, 1.0, 0.0)
    if resolve_backend(backend, v, x_t, x_next) == "torch":
        return reference.grpo_logprob(v, x_t, x_next, coef)
    return triton_module("grpo").grpo_logprob(v, x_t, x_next, coef)


def grpo_loss(v: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor,
              coef: torch.Tensor, *, v_ref: torch.Tensor | None = None, clip_range: float = 1e-4,
              adv_clip: float = 5.0, kl_beta: float = 0.04, backend: str = "auto"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO PPO-clipped loss of one micro-batch at one step per sample (methods.md section 7) -> ``(loss, stats)``.

    Latents ``v`` (with grad), ``x_t``, ``x_next``, ``v_ref`` (None = no KL term, no reference pass) ``[N, ...]``
    fp32 or bf16; ``lp_old``, ``adv`` ``[N]``; ``coef`` ``[N, 6]``. The fused path reads the latents once forward and
    once backward. Stats (per sample): ``log_prob``, ``ratio``, ``log_ratio``, ``policy_loss``, ``approx_kl``,
    ``clipped``, ``clipped_high``, ``clipped_low``, ``kl`` (with ``v_ref``).
    """
    validate.grpo_loss(v, x_t, x_next, lp_old, adv, coef, v_ref, clip_range, adv_clip, kl_beta)
    kwargs = dict(v_ref=v_ref, clip_range=clip_range, adv_clip=adv_clip, kl_beta=kl_beta)
    tensors = (v, x_t, x_next) + (() if v_ref is None else (v_ref,))
    if resolve_backend(backend, *tensors) == "torch":
        return reference.grpo_loss(v, x_t, x_next, lp_old, adv, coef, **kwargs)
    return triton_module("grpo").grpo_loss(v, x_t, x_next, lp_old, adv, coef, **kwargs)
