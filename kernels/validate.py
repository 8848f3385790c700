"""Input checks shared by both backends: bad input fails here, early, with one clear sentence.

Shape, dtype and device checks read only metadata (no host sync). Value checks (finite rewards, item indices in
range) need a device->host transfer; they run only in the once-per-epoch functions (``group_advantages``,
``fdfo_pairs``) or on CPU tensors, never inside a CUDA micro-step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels.reference import STD_FLOORS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
CENTERINGS = ("group", "batch")


def latents(fn: str, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """Same shape ``[N, ...]`` with ``N >= 1`` and ``D >= 1``, floating dtype, one device; returns ``(N, D)``."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{fn}: `{name}` must be a float16/bfloat16/float32/float64 tensor, got {t.dtype}.")
        if t.device != first.device:
            raise ValueError(f"{fn}: `{name}` is on {t.device} but `{first_name}` is on {first.device}.")
        if t.shape != first.shape:
            raise ValueError(f"{fn}: `{name}` has shape {tuple(t.shape)} but `{first_name}` has shape "
                             f"{tuple(first.shape)}; all latent tensors must have the same shape [N, ...].")
    if first.ndim == 0 or first.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch: `{first_name}` has shape {tuple(first.shape)}, expected [N, ...] "
                         f"with N >= 1.")
    n = first.shape[0]
    d = first[0].numel()
    if d == 0:
        raise ValueError(f"{fn}: `{first_name}` has shape {tuple(first.shape)}: each sample must have at least "
                         f"one element.")
    return n, d


def per_sample(fn: str, name: str, t: torch.Tensor, n: int, device: torch.device, *, integer: bool = False,
               allow_scalar: bool = False) -> None:
    """A ``[n]`` vector (or 0-d when ``allow_scalar``) on ``device`` of integer or floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
    kinds = INT_DTYPES if integer else FLOAT_DTYPES
    if t.dtype not in kinds:
        want = "an integer" if integer else "a floating-point"
        raise ValueError(f"{fn}: `{name}` must be {want} tensor, got {t.dtype}.")
    if t.device != device:
        raise ValueError(f"{fn}: `{name}` is on {t.device}, expected {device} like the latents.")
    if not (t.shape == (n,) or (allow_scalar and t.ndim == 0)):
        shape = f"({n},) or a scalar" if allow_scalar else f"({n},)"
        raise ValueError(f"{fn}: `{name}` has shape {tuple(t.shape)}, expected {shape}.")


def positive(fn: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{fn}: `{name}` must be > 0, got {value}.")


def finite(fn: str, name: str, t: torch.Tensor) -> None:
    """Reject NaN/inf values (one host sync: only for once-per-epoch inputs)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: `{name}` contains NaN or inf values; drop or fix those samples before calling.")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, adv_clip: float, std_floor: str = "max"
                     ) -> None:
    fn = "group_advantages"
    if std_floor not in STD_FLOORS:
        raise ValueError(f"{fn}: `std_floor` must be one of {STD_FLOORS}, got {std_floor!r}.")
    if not isinstance(rewards, torch.Tensor) or rewards.ndim != 1:
        raise ValueError(f"{fn}: `rewards` must be a 1-D tensor [N], got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}.")
    if rewards.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch: `rewards` has no elements.")
    per_sample(fn, "rewards", rewards, rewards.shape[0], rewards.device)
    per_sample(fn, "group_ids", group_ids, rewards.shape[0], rewards.device, integer=True)
    positive(fn, adv_clip=adv_clip)
    finite(fn, "rewards", rewards)


def crd_loss(v, v_old, u, v_pre_cond, v_pre_uncond, r01, rho, group_ids, beta, adv_clip, kl_beta, kl_min,
             centering, ratio_weight=None) -> tuple[int, int]:
    fn = "crd_loss"
    n, d = latents(fn, ("v", "v_old", "u", "v_pre_cond", "v_pre_uncond"), (v, v_old, u, v_pre_cond, v_pre_uncond))
    per_sample(fn, "r01", r01, n, v.device)
    per_sample(fn, "rho", rho, n, v.device)
    per_sample(fn, "group_ids", group_ids, n, v.device, integer=True)
    if ratio_weight is not None:
        per_sample(fn, "ratio_weight", ratio_weight, n, v.device)
    positive(fn, beta=beta, adv_clip=adv_clip)
    if kl_beta < 0 or kl_min < 0:
        raise ValueError(f"crd_loss: `kl_beta` and `kl_min` must be >= 0, got {kl_beta} and {kl_min}.")
    if centering not in CENTERINGS:
        raise ValueError(f"crd_loss: `centering` must be one of {CENTERINGS}, got {centering!r}.")
    return n, d


def nft_loss(v, v_old, v_pre, x_t, x0, sigma, r01, beta, adv_clip) -> tuple[int, int]:
    fn = "nft_loss"
    n, d = latents(fn, ("v", "v_old", "v_pre", "x_t", "x0"), (v, v_old, v_pre, x_t, x0))
    per_sample(fn, "sigma", sigma, n, v.device, allow_scalar=True)
    per_sample(fn, "r01", r01, n, v.device)
    positive(fn, beta=beta, adv_clip=adv_clip)
    return n, d


def fdfo_pairs(x_final: torch.Tensor, rewards: torch.Tensor) -> tuple[int, int]:
    fn = "fdfo_pairs"
    n, d = latents(fn, ("x_final",), (x_final,))
    if n % 2:
        raise ValueError(f"fdfo_pairs: `x_final` has {n} rows; pairs are consecutive rows (2p, 2p+1), so the "
                         f"number of rows must be even.")
    per_sample(fn, "rewards", rewards, n, x_final.device)
    finite(fn, "rewards", rewards)
    return n, d


def fdfo_loss(v, v_ref, dxh, dR, clip, item_index) -> tuple[int, int]:
    fn = "fdfo_loss"
    m, d = latents(fn, ("v", "v_ref"), (v, v_ref))
    if not isinstance(dxh, torch.Tensor) or dxh.dtype not in FLOAT_DTYPES or dxh.ndim == 0:
        raise ValueError("fdfo_loss: `dxh` must be a floating-point tensor [B, ...] (one row per branch).")
    if dxh.device != v.device:
        raise ValueError(f"fdfo_loss: `dxh` is on {dxh.device}, expected {v.device} like `v`.")
    if dxh.shape[1:] != v.shape[1:]:
        raise ValueError(f"fdfo_loss: `dxh` has per-row shape {tuple(dxh.shape[1:])} but `v` has "
                         f"{tuple(v.shape[1:])}; they must match.")
    b = dxh.shape[0]
    per_sample(fn, "dR", dR, b, v.device)
    if item_index is None:
        if b != m:
            raise ValueError(f"fdfo_loss: without `item_index`, `dxh` must have one row per item ({m}), got {b}; "
                             f"pass item_index [M] mapping items to branch rows.")
    else:
        per_sample(fn, "item_index", item_index, m, v.device, integer=True)
        if item_index.device.type == "cpu" and bool(((item_index < 0) | (item_index >= b)).any()):
            raise ValueError(f"fdfo_loss: `item_index` values must lie in [0, {b}) (rows of `dxh`).")
    positive(fn, clip=clip)
    return m, d


def grpo_loss(v, x_t, x_next, lp_old, adv, coef, v_ref, clip_range, adv_clip, kl_beta) -> tuple[int, int]:
    fn = "grpo_loss"
    names, tensors = ["v", "x_t", "x_next"], [v, x_t, x_next]
    if v_ref is not None:
        names.append("v_ref")
        tensors.append(v_ref)
    n, d = latents(fn, names, tensors)
    if lp_old is not None:
        per_sample(fn, "lp_old", lp_old, n, v.device)
        per_sample(fn, "adv", adv, n, v.device)
        positive(fn, clip_range=clip_range, adv_clip=adv_clip)
        if kl_beta < 0:
            raise ValueError(f"{fn}: `kl_beta` must be >= 0, got {kl_beta}.")
    if not isinstance(coef, torch.Tensor) or coef.shape != (n, 6) or coef.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: `coef` must be a floating-point tensor of shape ({n}, 6) (from "
                         f"kernels.reference.grpo_coefficients), got "
                         f"{tuple(coef.shape) if isinstance(coef, torch.Tensor) else type(coef).__name__}.")
    if coef.device != v.device:
        raise ValueError(f"{fn}: `coef` is on {coef.device}, expected {v.device} like the latents.")
    return n, d
