"""Plain-torch reference versions of every kernel: the math of ``shared/spec/methods.md`` sections 1-4 and 7, in code.

These functions ARE the spec: the fused Triton kernels in this package are tested against them, value and gradient.
They assume valid inputs (the public functions in ``kernels/__init__.py`` validate before dispatching here).

Conventions
- Latents are ``[N, ...]``; every trailing dimension is flattened to ``D`` elements per sample, and
  ``mean_pix`` is the mean over those ``D`` elements.
- Arithmetic is fp32 (fp64 when the inputs are fp64, so ``torch.autograd.gradcheck`` can run); losses are fp32
  (fp64 for fp64 inputs); the gradient comes back in ``v``'s dtype.
- Only ``v`` receives a gradient in the losses; every other tensor is detached here.
- Group ids are arbitrary integers (not contiguous, not sorted). Groups are found with a sort, which equals
  ``torch.unique(group_ids, return_inverse=True)`` but needs no host sync (no data-dependent output size).
- No host syncs anywhere (no ``.item()``, ``.cpu()``, ``.tolist()``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

#: ``(values [N, k], group_ids [N]) -> [N, k]`` per-sample group means (see :func:`local_group_mean`)
GroupMeanFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Floors of the spec (methods.md): the std floor of the advantage, the weight floor of the adaptive weights, and the
# epsilon of the FDFO direction normalisation.
STD_FLOOR = 1e-6
#: the official DiffusionNFT trainer's additive std floor: ``A = (R - mean) / (std + 1e-4)``
STD_FLOOR_ADDITIVE = 1e-4
#: ``std_floor`` names of :func:`group_advantages`: ``max`` = ``max(std, STD_FLOOR)``, ``additive`` =
#: ``std + STD_FLOOR_ADDITIVE``
STD_FLOORS = ("max", "additive")
WEIGHT_FLOOR = 1e-5
FDFO_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------- helpers
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); every other float dtype is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[N, ...] -> [N, D]`` in ``dtype`` (a view when no cast is needed)."""
    return x.reshape(x.shape[0], -1).to(dtype)


def mean_pix(x: torch.Tensor) -> torch.Tensor:
    """Mean over the ``D`` elements of each sample of a ``[N, D]`` tensor -> ``[N]``."""
    return x.mean(dim=1)


def group_inverse(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group index of every sample and the number of groups (a 0-d tensor), without a host sync.

    Returns ``(inverse, num_groups)`` where ``inverse[i]`` in ``[0, num_groups)`` numbers the distinct ids in
    ascending order: the same as ``torch.unique(group_ids, return_inverse=True)[1]``. Buffers indexed by
    ``inverse`` are sized ``N`` (an upper bound on the number of groups), so no output size depends on data.
    """
    sorted_ids, order = torch.sort(group_ids.reshape(-1))
    is_new = torch.ones_like(sorted_ids, dtype=torch.long)
    is_new[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense_sorted = torch.cumsum(is_new, 0) - 1
    inverse = torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)
    return inverse, is_new.sum()


def group_sum(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Per-group sums of a ``[N, ...]`` tensor, as a ``[N, ...]`` buffer indexed by group (unused slots are 0)."""
    return torch.zeros_like(x).index_add_(0, inverse, x)


def group_mean(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (``[N]`` or ``[N, k]``) over each sample's group, gathered back per sample."""
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    counts = torch.zeros_like(ones).index_add_(0, inverse, ones)
    counts = counts.clamp_min(1).reshape(-1, *([1] * (x.ndim - 1)))
    return (group_sum(x, inverse) / counts)[inverse]


def local_group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Default ``group_mean_fn``: per-sample group means of ``values [N, k]`` over this micro-batch only.

    A distributed engine passes its own function with this signature that gathers the detached per-sample scalars
    of every rank, so groups split across ranks are still centered exactly.
    """
    return group_mean(values, group_inverse(group_ids)[0])


# ----------------------------------------------------------------------------------------- 1. group advantages
def floored_std(std: torch.Tensor, std_floor: str = "max") -> torch.Tensor:
    """The std that divides the advantages: ``max(std, 1e-6)`` (``"max"``) or ``std + 1e-4`` (``"additive"``, the
    official DiffusionNFT trainer's ``flow_grpo/stat_tracking.py``)."""
    return std + STD_FLOOR_ADDITIVE if std_floor == "additive" else std.clamp_min(STD_FLOOR)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool = True,
                     adv_clip: float = 5.0, std_floor: str = "max"
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Grouped centering of rewards (methods.md section 1).

    ``A_i = (R_i - mean_{g(i)} R) / max(std, 1e-6)`` (``std_floor="max"``) or ``/ (std + 1e-4)``
    (``std_floor="additive"``, the official DiffusionNFT trainer's floor) with ``std`` the population std (ddof 0) of
    all rewards (``global_std=True``) or of the sample's group;
    ``r_i = clip(0.5 + clip(A_i, -A_max, A_max) / (2 A_max), 0, 1)``.

    Documented behaviour: a group whose rewards are all equal (a one-member group in particular) gets ``A = 0``
    exactly, in both std modes and with both floors (its centered reward is 0; setting it exactly removes the
    rounding of the mean).

    Returns ``(adv, r01, stats)``: ``adv`` the clipped advantage ``[N]`` (fp32), ``r01`` in [0, 1] ``[N]``, and
    stats: ``zero_std_fraction`` (0-d, fraction of groups with all-equal rewards), ``num_groups`` (0-d),
    ``std`` (per-sample std before the floor; :func:`floored_std` of it divides), ``group_mean`` (per sample),
    ``adv_raw`` (unclipped advantage), ``group_index``.
    """
    dtype = compute_dtype(rewards)
    r = rewards.reshape(-1).to(dtype)
    inverse, num_groups = group_inverse(group_ids)
    mean_g = group_mean(r, inverse)
    centered = r - mean_g

    if global_std:
        std = (r - r.mean()).square().mean().sqrt().expand_as(r)
    else:
        std = group_mean(centered.square(), inverse).sqrt()

    # groups with all-equal rewards: max == min within the group
    big = torch.finfo(dtype).max
    gmax = torch.full_like(r, -big).scatter_reduce(0, inverse, r, reduce="amax")
    gmin = torch.full_like(r, big).scatter_reduce(0, inverse, r, reduce="amin")
    flat_group = gmax == gmin  # [N] indexed by group (unused slots: -big != big -> False)
    zero_std = flat_group[inverse]

    adv_raw = torch.where(zero_std, torch.zeros_like(r), centered / floored_std(std, std_floor))
    adv = adv_raw.clamp(-adv_clip, adv_clip)
    r01 = (0.5 + adv / (2.0 * adv_clip)).clamp(0.0, 1.0)
    stats = {
        "zero_std_fraction": flat_group.sum().to(dtype) / num_groups.to(dtype),
        "num_groups": num_groups,
        "std": std,
        "group_mean": mean_g,
        "adv_raw": adv_raw,
        "group_index": inverse,
    }
    return adv, r01, stats


# ------------------------------------------------------------------------------------------------------ 2. CRD
def cfg_combine(v_pre_cond: torch.Tensor, v_pre_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``v_cfg = v_uncond + w (v_cond - v_uncond)``."""
    return v_pre_uncond + cfg_scale * (v_pre_cond - v_pre_uncond)


def crd_per_sample(l: torch.Tensor, kl: torch.Tensor, r01: torch.Tensor, rho: torch.Tensor,
                   group_ids: torch.Tensor, *, beta: float, adv_clip: float, kl_beta: float, kl_min: float,
                   centering: str, group_mean_fn: GroupMeanFn | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-sample stage of CRD from the per-sample log-ratios ``l`` and KLs ``kl`` (shared with the fused path).

    ``lc = l - sg(mean_g l)``, ``rc = r - mean_g r``, ``L_crd = (A_max / beta) mean (beta lc - rc)^2``,
    ``c = kl_min + (kl_beta - kl_min) rho``, ``L_kl = mean c kl``, ``loss = L_crd + L_kl``.
    ``mean_g`` is over the sample's group (``centering="group"``, through ``group_mean_fn``, default
    :func:`local_group_mean`) or over the micro-batch (``"batch"``).
    """
    if centering == "group":
        means = (group_mean_fn or local_group_mean)(torch.stack([l.detach(), r01], dim=1), group_ids)
        l_base, r_base = means[:, 0], means[:, 1]
    else:
        l_base, r_base = l.detach().mean(), r01.mean()
    lc = l - l_base  # the baseline is detached (sg): no gradient through the mean
    rc = r01 - r_base
    e = beta * lc - rc
    loss_crd = (adv_clip / beta) * e.square().mean()
    kl_coef = kl_min + (kl_beta - kl_min) * rho
    loss_kl = (kl_coef * kl).mean()
    stats = {"lc": lc.detach(), "rc": rc, "e": e.detach(), "kl_coef": kl_coef,
             "loss_crd": loss_crd.detach(), "loss_kl": loss_kl.detach()}
    return loss_crd + loss_kl, stats


def crd_loss(v: torch.Tensor, v_old: torch.Tensor, u: torch.Tensor, v_pre_cond: torch.Tensor,
             v_pre_uncond: torch.Tensor, r01: torch.Tensor, rho: torch.Tensor, group_ids: torch.Tensor, *,
             beta: float = 1.0, adv_clip: float = 5.0, cfg_scale: float = 4.5, kl_beta: float = 0.1,
             kl_min: float = 1e-4, centering: str = "group", group_mean_fn: GroupMeanFn | None = None,
             ratio_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Centered Reward Distillation loss of one micro-batch at one timestep (methods.md section 2, step 5).

    - ``w_th = sg(max(mean_pix|v - u|, 1e-5))``, ``w_old = max(mean_pix|v_old - u|, 1e-5)`` (the adaptive weights);
      ``ratio_weight [N]`` replaces both by a fixed per-sample weight (CRD's ``log_ratio: elbo`` passes
      ``sigma / ((1 - sigma) D)``, making ``l`` the ELBO difference in nats);
    - ``l_i = -mean_pix[(v - u)^2 / w_th - (v_old - u)^2 / w_old]`` (implicit reward / log-ratio estimate);
    - ``kl_i = mean_pix (v - v_cfg)^2`` with the CFG anchor ``v_cfg = v_uncond + cfg_scale (v_cond - v_uncond)``;
    - centering, loss and the adaptive KL coefficient ``c_i = kl_min + (kl_beta - kl_min) rho_i``:
      see :func:`crd_per_sample`. ``centering="group"`` is exact per prompt group; ``"batch"`` subtracts the
      micro-batch mean. ``group_mean_fn(values [N, k], group_ids) -> [N, k]`` replaces the local group means
      (a distributed engine gathers the detached per-sample scalars across ranks there).

    Gradient (only ``v``): ``dL/dv_i = (2 A_max / N) e_i (-(2/D)(v - u) / w_th) + (2 c_i / (N D)) (v - v_cfg)``,
    ``e_i = beta lc_i - rc_i``. Stats (per sample): ``log_ratio``, ``kl``, ``w_th``, ``w_old``, ``kl_coef``,
    ``lc``, ``rc``, ``e``; 0-d: ``loss_crd``, ``loss_kl``.
    """
    dt = compute_dtype(v)
    v32 = flat(v, dt)
    u32, vo32 = flat(u, dt).detach(), flat(v_old, dt).detach()
    v_cfg = cfg_combine(flat(v_pre_cond, dt), flat(v_pre_uncond, dt), cfg_scale).detach()

    if ratio_weight is None:
        w_th = mean_pix((v32 - u32).abs()).clamp_min(WEIGHT_FLOOR).detach()
        w_old = mean_pix((vo32 - u32).abs()).clamp_min(WEIGHT_FLOOR)
    else:
        w_th = w_old = ratio_weight.reshape(-1).to(dt).detach()
    # -(a - b) written as b - a: the same number, but +0.0 (not -0.0) when v == v_old
    log_ratio = mean_pix((vo32 - u32).square()) / w_old - mean_pix((v32 - u32).square()) / w_th
    kl = mean_pix((v32 - v_cfg).square())

    loss, stats = crd_per_sample(log_ratio, kl, r01.reshape(-1).to(dt).detach(), rho.reshape(-1).to(dt).detach(),
                                 group_ids, beta=beta, adv_clip=adv_clip, kl_beta=kl_beta, kl_min=kl_min,
                                 centering=centering, group_mean_fn=group_mean_fn)
    stats.update(log_ratio=log_ratio.detach(), kl=kl.detach(), w_th=w_th, w_old=w_old)
    return loss, stats


# ------------------------------------------------------------------------------------------------------ 3. NFT
def nft_per_sample(l_pos: torch.Tensor, l_neg: torch.Tensor, kl: torch.Tensor, r01: torch.Tensor, *,
                   beta: float, adv_clip: float, kl_beta: float) -> torch.Tensor:
    """``L = A_max mean(r L_pos + (1 - r) L_neg) / beta + kl_beta mean(kl)`` (shared with the fused path)."""
    return adv_clip * (r01 * l_pos + (1.0 - r01) * l_neg).mean() / beta + kl_beta * kl.mean()


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, v_pre: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
             sigma: torch.Tensor, r01: torch.Tensor, *, beta: float = 1.0, adv_clip: float = 5.0,
             kl_beta: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss (methods.md section 3); ``sigma`` is ``[N]`` (or 0-d), ``beta`` is ``beta_nft``.

    ``v_pos = beta v + (1 - beta) sg(v_old)``, ``v_neg = (1 + beta) sg(v_old) - beta v``;
    ``x0_pos = x_t - sigma v_pos``; ``L_pos = mean_pix (x0_pos - x0)^2 / sg(max(mean_pix|x0_pos - x0|, 1e-5))``,
    same for neg; ``L = A_max mean_i(r L_pos + (1 - r) L_neg) / beta + kl_beta mean_i mean_pix (v - v_pre)^2``.
    Stats (per sample): ``l_pos``, ``l_neg``, ``w_pos``, ``w_neg``, ``kl``.
    """
    dt = compute_dtype(v)
    v32 = flat(v, dt)
    vo, vp = flat(v_old, dt).detach(), flat(v_pre, dt).detach()
    xt, x0f = flat(x_t, dt).detach(), flat(x0, dt).detach()
    s = sigma.to(dt).reshape(-1, 1).expand(v32.shape[0], 1).detach()

    v_pos = beta * v32 + (1.0 - beta) * vo
    v_neg = (1.0 + beta) * vo - beta * v32
    err_pos = (xt - s * v_pos) - x0f
    err_neg = (xt - s * v_neg) - x0f
    w_pos = mean_pix(err_pos.abs()).clamp_min(WEIGHT_FLOOR).detach()
    w_neg = mean_pix(err_neg.abs()).clamp_min(WEIGHT_FLOOR).detach()
    l_pos = mean_pix(err_pos.square()) / w_pos
    l_neg = mean_pix(err_neg.square()) / w_neg
    kl = mean_pix((v32 - vp).square())
    loss = nft_per_sample(l_pos, l_neg, kl, r01.reshape(-1).to(dt).detach(), beta=beta, adv_clip=adv_clip,
                          kl_beta=kl_beta)
    stats = {"l_pos": l_pos.detach(), "l_neg": l_neg.detach(), "w_pos": w_pos, "w_neg": w_neg, "kl": kl.detach()}
    return loss, stats


# ----------------------------------------------------------------------------------------------------- 4. FDFO
def fdfo_pairs(x_final: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-difference pairs (methods.md section 4, step 3); rows ``2p`` and ``2p + 1`` are the pair's branches.

    For branch ``k`` with partner ``k'``: ``dR_k = (R_k - R_k') / 2``, ``dx_k = (x_T^k - x_T^k') / 2``,
    ``dxh_k = dx_k / (mean_pix(dx_k^2) + 1e-6)``. Returns per ROW (per branch) ``dR`` ``[2P]`` and ``dxh``
    shaped like ``x_final``, both fp32 (fp64 for fp64 inputs). Nothing here carries a gradient.
    """
    dt = compute_dtype(x_final)
    x = flat(x_final, dt).detach()
    r = rewards.reshape(-1).to(dt).detach()
    partner = torch.arange(x.shape[0], device=x.device) ^ 1  # 0<->1, 2<->3, ...
    dR = (r - r[partner]) / 2
    dx = (x - x[partner]) / 2
    dxh = dx / (mean_pix(dx.square()) + FDFO_EPS).unsqueeze(1)
    return dR, dxh.reshape(x_final.shape)


def fdfo_per_item(ell: torch.Tensor, ell_ref: torch.Tensor, dR: torch.Tensor, *, clip: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPO surrogate from per-item log-likelihood proxies: returns ``(loss, rho)`` (shared with the fused path).

    ``rho = exp(ell - ell_ref)``, ``L = mean(-dR rho + |dR| / (2 clip) (rho - 1)^2)``.
    """
    rho = torch.exp(ell - ell_ref)
    per_item = -dR * rho + dR.abs() / (2.0 * clip) * (rho - 1.0).square()
    return per_item.mean(), rho


def fdfo_loss(v: torch.Tensor, v_ref: torch.Tensor, dxh: torch.Tensor, dR: torch.Tensor, *, clip: float = 0.03,
              item_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FDFO SPO surrogate over items (branch, step) (methods.md section 4, step 5).

    ``v``, ``v_ref``: ``[M, ...]`` items; ``dxh``: ``[B, ...]`` and ``dR``: ``[B]`` per branch; ``item_index``
    ``[M]`` maps each item to its branch row (``None``: ``B == M`` and row ``i`` belongs to item ``i``), so no
    per-step copy of ``dxh`` is ever made. With ``v* = v_ref - dxh``:
    ``ell = -mean_pix (v - v*)^2`` evaluated as ``-mean_pix ((v - v_ref) + dxh)^2`` (so ``v == v_ref`` gives
    exactly ``ell == ell_ref``), ``ell_ref = -mean_pix dxh^2``, ``rho = exp(ell - ell_ref)``,
    ``L = mean(-dR rho + |dR| / (2 clip) (rho - 1)^2)``.
    Gradient: ``dL/dv = (1/M) (dL/drho) rho (-(2/D)(v - v*))``. Stats (per item): ``ratio``, ``log_ratio``.
    """
    dt = compute_dtype(v)
    v32 = flat(v, dt)
    vr = flat(v_ref, dt).detach()
    d = flat(dxh, dt).detach()
    dr = dR.reshape(-1).to(dt).detach()
    if item_index is not None:
        d, dr = d[item_index], dr[item_index]
    ell = -mean_pix(((v32 - vr) + d).square())
    ell_ref = -mean_pix(d.square())
    loss, rho = fdfo_per_item(ell, ell_ref, dr, clip=clip)
    return loss, {"ratio": rho.detach(), "log_ratio": (ell - ell_ref).detach()}


# ------------------------------------------------------------------------------------------------- 7. Flow-GRPO
#: ``sde_type`` of :func:`grpo_coefficients`: the official flow SDE, or Coefficients-Preserving Sampling
GRPO_SDE_TYPES = ("sde", "cps")
#: columns of the per-sample coefficient table ``coef [N, 6]`` every GRPO function takes (one row per sample and
#: step): the mean ``a x + b v`` of the transition, the std of its noise, and the log-prob / KL scales
GRPO_A, GRPO_B, GRPO_NOISE, GRPO_INV2VAR, GRPO_LP_CONST, GRPO_KL_SCALE = range(6)


def grpo_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, *, noise_level: float, sde_type: str = "sde",
                      sigma_max: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-sample coefficients of one SDE step ``sigma -> sigma_next`` (methods.md section 7) -> ``coef [N, 6]``.

    Scheduler arithmetic in ``sigma``'s dtype (fp32 in the engine, as the official trainer; fp64 for gradcheck).
    ``dt = sigma_next - sigma < 0``. The mean is written affine in v, ``a x + b v`` with per-sample ``a``, ``b``
    (equal to the official expressions in exact arithmetic; the official code multiplies ``v`` by its two factors
    in turn and forms the CPS mean from ``x0_hat``/``eps_hat``, so fp32 results differ by rounding, ~1e-7).
    - ``sde``: ``std_dev = sqrt(sigma / (1 - sigma')) * noise_level`` with ``sigma' = sigma_max`` (the table's
      second entry) where ``sigma == 1``, else ``sigma``; mean ``x (1 + std_dev^2 / (2 sigma) dt) +
      v (1 + std_dev^2 (1 - sigma) / (2 sigma)) dt``; noise std ``s = std_dev sqrt(-dt)``; per element
      ``log p = -(x_next - mean)^2 / (2 s^2) - log s - log sqrt(2 pi)``.
    - ``cps``: ``std_dev = sigma_next sin(pi noise_level / 2)``; mean ``x0_hat (1 - sigma_next) + eps_hat
      sqrt(sigma_next^2 - std_dev^2)`` with ``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v``, i.e.
      ``a = (1 - sigma_next) + c``, ``b = -sigma (1 - sigma_next) + (1 - sigma) c``, ``c = sqrt(...)``; noise std
      ``std_dev``; ``log p = -(x_next - mean)^2`` (the official code drops every constant).
    Columns (``GRPO_*``): ``a``, ``b``, noise std, ``inv2var`` (the factor of ``-(x_next - mean)^2``),
    ``lp_const``, ``kl_scale = 1 / (2 std_dev^2)`` (the official KL divides by ``std_dev``, not the noise std).
    """
    s = sigma.reshape(-1)
    sn = torch.as_tensor(sigma_next, dtype=s.dtype, device=s.device).reshape(-1).expand_as(s)
    dt = sn - s
    if sde_type == "sde":
        smax = torch.as_tensor(sigma_max, dtype=s.dtype, device=s.device)
        std_dev = torch.sqrt(s / (1 - torch.where(s == 1, smax, s))) * noise_level
        a = 1 + std_dev ** 2 / (2 * s) * dt
        b = (1 + std_dev ** 2 * (1 - s) / (2 * s)) * dt
        noise = std_dev * torch.sqrt(-1 * dt)
        inv2var = 1 / (2 * noise ** 2)
        lp_const = -torch.log(noise) - math.log(math.sqrt(2 * math.pi))
    elif sde_type == "cps":
        std_dev = sn * math.sin(noise_level * math.pi / 2)
        c = torch.sqrt(sn ** 2 - std_dev ** 2)
        a = (1 - sn) + c
        b = -s * (1 - sn) + (1 - s) * c
        noise = std_dev
        inv2var = torch.ones_like(s)
        lp_const = torch.zeros_like(s)
    else:
        raise ValueError(f"sde_type must be one of {GRPO_SDE_TYPES}, got {sde_type!r}")
    return torch.stack([a, b, noise, inv2var, lp_const, 1 / (2 * std_dev ** 2)], dim=1)


def grpo_ode_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The deterministic Euler step ``x + (sigma_next - sigma) v`` in the same ``coef`` layout (no noise; used
    outside Flow-GRPO-Fast's SDE window, never trained on)."""
    s = sigma.reshape(-1)
    dt = torch.as_tensor(sigma_next, dtype=s.dtype, device=s.device).reshape(-1).expand_as(s) - s
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return torch.stack([one, dt, zero, one, zero, zero], dim=1)


def grpo_step(x_t: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """One sampler step: ``x_next = a x + b v + noise_std xi`` in fp32 (``v``, ``x`` cast first, as the official
    step does: bf16 overflows in the mean)."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a, b, n = (coef[:, k].to(torch.float32).reshape(shape) for k in (GRPO_A, GRPO_B, GRPO_NOISE))
    return a * x_t.float() + b * v.float() + n * xi.float()


def grpo_sums(v: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor, coef: torch.Tensor,
              v_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample ``mean_pix (x_next - mean)^2`` with ``mean = a x + b v`` and, with ``v_ref``,
    ``mean_pix (mean - mean_ref)^2 = b^2 mean_pix (v - v_ref)^2`` (the mean is affine in v: the x terms cancel
    exactly, so policy == reference gives KL exactly 0)."""
    dt = compute_dtype(v)
    v32, x, xn = flat(v, dt), flat(x_t, dt).detach(), flat(x_next, dt).detach()
    c = coef.to(dt).detach()
    a, b = c[:, GRPO_A:GRPO_A + 1], c[:, GRPO_B:GRPO_B + 1]
    sq = mean_pix((xn - (a * x + b * v32)).square())
    if v_ref is None:
        return sq, None
    return sq, c[:, GRPO_B].square() * mean_pix((v32 - flat(v_ref, dt).detach()).square())


def grpo_logprob_from_sums(sq: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``log p = -inv2var mean_pix (x_next - mean)^2 + lp_const`` (shared with the fused path)."""
    c = coef.to(sq.dtype).detach()
    return -(sq * c[:, GRPO_INV2VAR]) + c[:, GRPO_LP_CONST]


def grpo_logprob(v: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Per-sample transition log-prob of ``x_t -> x_next`` under velocity ``v`` (mean over the latent's elements)."""
    return grpo_logprob_from_sums(grpo_sums(v, x_t, x_next, coef)[0], coef)


def grpo_per_sample(lp: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor, kl: torch.Tensor | None, *,
                    clip_range: float, adv_clip: float, kl_beta: float
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO stage from per-sample log-probs (shared with the fused path):
    ``A = clip(adv, -adv_clip, adv_clip)``, ``ratio = exp(lp - lp_old)``,
    ``L = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + kl_beta mean kl``. Stats (per sample): ``ratio``,
    ``log_ratio``, ``policy_loss``, ``approx_kl = (lp - lp_old)^2 / 2``, ``clipped`` (``|ratio - 1| > eps``),
    ``clipped_high``, ``clipped_low``, ``kl`` (when given)."""
    A = adv.reshape(-1).to(lp.dtype).detach().clamp(-adv_clip, adv_clip)
    log_ratio = lp - lp_old.reshape(-1).to(lp.dtype).detach()
    ratio = torch.exp(log_ratio)
    policy = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    loss = policy.mean()
    r = ratio.detach()
    stats = {"ratio": r, "log_ratio": log_ratio.detach(), "policy_loss": policy.detach(),
             "approx_kl": 0.5 * log_ratio.detach().square(), "clipped": ((r - 1.0).abs() > clip_range).to(lp.dtype),
             "clipped_high": (r - 1.0 > clip_range).to(lp.dtype), "clipped_low": (1.0 - r > clip_range).to(lp.dtype)}
    if kl is not None:
        loss = loss + kl_beta * kl.mean()
        stats["kl"] = kl.detach()
    return loss, stats


def grpo_loss(v: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor,
              coef: torch.Tensor, *, v_ref: torch.Tensor | None = None, clip_range: float = 1e-4,
              adv_clip: float = 5.0, kl_beta: float = 0.04) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO loss of one micro-batch at one step per sample (methods.md section 7).

    ``v`` (with grad), ``x_t``, ``x_next``, ``v_ref`` (the reference's velocity; None = no KL term): ``[N, ...]``;
    ``lp_old``, ``adv`` ``[N]``; ``coef`` ``[N, 6]`` from :func:`grpo_coefficients`.
    ``lp = -inv2var mean_pix (x_next - a x - b v)^2 + lp_const``; the PPO stage is :func:`grpo_per_sample`;
    ``kl_i = kl_scale_i mean_pix (mean - mean_ref)^2 = kl_scale b^2 mean_pix (v - v_ref)^2`` (the official
    ``((mean - mean_ref)^2).mean() / (2 std_dev^2)``).
    Gradient (only ``v``): ``dL/dv = dL/dlp (2 b inv2var / D)(x_next - mean) + dL/dkl (2 kl_scale b^2 / D)(v - v_ref)``.
    """
    sq, kl_sq = grpo_sums(v, x_t, x_next, coef, v_ref)
    lp = grpo_logprob_from_sums(sq, coef)
    kl = None if kl_sq is None else coef[:, GRPO_KL_SCALE].to(kl_sq.dtype).detach() * kl_sq
    loss, stats = grpo_per_sample(lp, lp_old, adv, kl, clip_range=clip_range, adv_clip=adv_clip, kl_beta=kl_beta)
    stats["log_prob"] = lp.detach()
    return loss, stats
