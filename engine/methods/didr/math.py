"""DIDR's math as plain functions, each one a line of the spec (methods.md section 5), the checks of what DIDR can
be combined with, and the parameters of its two trained networks."""
from __future__ import annotations

from typing import Any, Callable

import torch

from engine.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# The math, as plain functions (each one a line of the spec)
# ---------------------------------------------------------------------------------------------------------------

def to_accumulation(x: torch.Tensor) -> torch.Tensor:
    """x in an accumulation dtype of at least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bcast_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] sigma -> [B, 1, 1, ...] in x's dtype, to broadcast against x."""
    return sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Score ``s = -eps_hat / sigma``, ``eps_hat = x + (1 - sigma) v`` (sigma [B], kept away from 0 by callers)."""
    s = bcast_sigma(sigma, x)
    return -(x + (1 - s) * v) / s


def denoise_k(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor,
              sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """Phi_K: ``steps`` deterministic Euler steps from sigma to 0 on the uniform grid sigma * (1 - k/K).

    Differentiable w.r.t. ``x_t`` (no detach inside); K = 1 is the Tweedie jump ``x0_hat = x_t - sigma v``.
    """
    x = x_t
    for k in range(steps):
        s_now = sigma * (1 - k / steps)
        s_next = sigma * (1 - (k + 1) / steps)
        x = x + bcast_sigma(s_next - s_now, x) * velocity_fn(x, s_now)
    return x


def diffused_reward_proxy(x_t: torch.Tensor, sigma: torch.Tensor, reward_of_x0: Callable[[torch.Tensor], torch.Tensor],
                          velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, steps: int,
                          beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DRP ``s_r_hat = (1/beta) grad_{x_t} r(Phi_K(x_t))`` on its own autograd graph, returned detached.

    ``reward_of_x0`` maps latents x0 [B, ...] to per-sample rewards [B] (decode + differentiable reward).
    Returns ``(s_r_hat, r)`` with ``r`` the detached reward of the denoised estimate (for logging).
    Only ``x_t`` is differentiated (``autograd.grad`` with ``inputs``): no parameter gradient is accumulated.
    """
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        r = reward_of_x0(denoise_k(velocity_fn, x_in, sigma, steps))
        (grad,) = torch.autograd.grad(r.sum(), x_in)
    return (grad / beta).detach(), r.detach()


def dmd_weight(x0: torch.Tensor, x0_hat_ref: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """Per-sample weight ``1 / sg(max(mean_pix |x0 - x0_hat_ref|, floor))``, fp32 [B]."""
    dims = tuple(range(1, x0.ndim))
    return 1.0 / (to_accumulation(x0.detach()) - to_accumulation(x0_hat_ref.detach())).abs().mean(dims).clamp_min(floor)


def x0_space_factor(sigma: torch.Tensor) -> torch.Tensor:
    """``sigma^2 / (1 - sigma)``: a score difference at sigma times this is the x0-prediction difference
    (``x0_hat = (x + sigma^2 s) / (1 - sigma)``); fp32 [B] (1 - sigma floored at 1e-4)."""
    s = to_accumulation(sigma)
    return s * s / (1 - s).clamp_min(1e-4)


def generator_surrogate(x_t: torch.Tensor, direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mean_i w_i * sum_pix(sg(direction_i) * x_t_i)``: its gradient is ``w (d - s_r) dx_t/dtheta`` per sample."""
    dims = tuple(range(1, x_t.ndim))
    return (weight * (to_accumulation(direction.detach()) * to_accumulation(x_t)).sum(dims)).mean()


def regression_loss(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generator initialisation / DMD regression: ``mean_i mean_pix (g(z_i) - x_ref_i)^2`` against reference samples
    ``x_ref`` made from the same noise ``z`` (no gradient into the target)."""
    return (to_accumulation(x0) - to_accumulation(target.detach())).pow(2).mean()


def ta_flow_matching_loss(v_fake: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Fake-score (TA) loss: ``mean_i mean_pix (v_psi - (eps - x0))^2`` with x0 from the (stopped) generator."""
    return (to_accumulation(v_fake) - (to_accumulation(eps) - to_accumulation(x0.detach()))).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Validation of what DIDR can be combined with
# ---------------------------------------------------------------------------------------------------------------

def check_generator(generator: Any) -> None:
    """DIDR needs a one-step generator exposing ``generate(z, cond)`` and ``velocity(x, sigma, cond, adapter=...)``."""
    if not (callable(getattr(generator, "generate", None)) and callable(getattr(generator, "velocity", None))):
        raise ConfigError(
            f"DIDR needs a one-step generator (models/onestep.py: UNetOneStep, or FlowOneStep via didr.one_step=flow), "
            f"but {type(generator).__name__} is a multi-step model without generate(z, cond)")


def check_reward(reward: Any) -> None:
    """DIDR needs a differentiable reward (``differentiable = True`` and ``score_differentiable``)."""
    if getattr(reward, "differentiable", False) and callable(getattr(reward, "score_differentiable", None)):
        return
    parts = getattr(reward, "components", None)
    if parts is not None:  # a RewardSet: name the offending components
        names = [c.key for c in parts if c.weight != 0 and not getattr(c.reward, "differentiable", False)]
    else:
        names = [getattr(reward, "name", type(reward).__name__)]
    raise ConfigError(
        f"DIDR needs a differentiable reward (its gradient drives the Diffused Reward Proxy), but {names} "
        f"{'is' if len(names) == 1 else 'are'} not differentiable: use e.g. testbed_classifier, pickscore, clip_score, "
        f"hps or aesthetic (or FDFO/CRD, which take any reward)")


# ---------------------------------------------------------------------------------------------------------------
# Parameters of the two trained networks (each gets its own optimizer: engine.stepper.TorchStepper)
# ---------------------------------------------------------------------------------------------------------------

def adapter_params(model: Any, name: str) -> list[torch.nn.Parameter]:
    """Trainable parameters of adapter ``name`` through the adapter protocol (``model.adapters.params``)."""
    adapters = getattr(model, "adapters", None)
    if adapters is None or name not in getattr(adapters, "names", ()):
        raise ValueError(f"DIDR: the model has no {name!r} adapter (models/lora.py adapters with names including "
                         f"'policy' and 'fake' are required)")
    return [p for p in adapters.params(name).values() if p.requires_grad]
