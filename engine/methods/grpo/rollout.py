"""Flow-GRPO's rollout: the SDE sampler with per-step log-probs, stored for the steps that are trained."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import kernels
from kernels.reference import grpo_coefficients, grpo_ode_coefficients, grpo_step
from models.base import Cond


@dataclass
class Trajectories:
    """One rank's SDE rollouts, ``n`` rows in processing order, ``K`` trained steps per row.

    Row ``r``'s trained steps are ``start[r] .. start[r] + K - 1`` of the sampler (``start = 0`` without a window):
    ``latents`` [K + 1, n, ...] fp32, the state before each trained step and after the last one (step k goes
    ``latents[k] -> latents[k + 1]``); ``log_probs`` [K, n] the rollout's ``lp_old``; ``coef`` [K, n, 6] the step
    coefficients (``kernels.reference.grpo_coefficients``); ``sigma`` [K, n] the sigma of the velocity call;
    ``start`` [n]; ``x_final`` [n, ...] fp32 (decode it for the rewards).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    coef: torch.Tensor
    sigma: torch.Tensor
    start: torch.Tensor
    x_final: torch.Tensor

    @property
    def num_train_steps(self) -> int:
        return self.log_probs.shape[0]


def velocity_for(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, cfg_scale: float, adapter: str,
                 detach_uncond: bool = False) -> torch.Tensor:
    """The one velocity rule of GRPO's rollout and training: CFG ``v_u + w (v_c - v_u)`` from ONE batched
    cond/null forward (``velocity_cfg_pair``), the same arithmetic as ``FlowModel.guided_velocity``;
    ``detach_uncond`` stops the gradient through ``v_u`` (values unchanged, so the ratio stays exactly 1)."""
    if cfg_scale == 1.0:
        return model.velocity(x, sigma, cond, adapter=adapter)
    v_c, v_u = model.velocity_cfg_pair(x, sigma, cond, adapter=adapter)
    if v_c is v_u:  # a guidance-distilled family (FLUX.1-dev) returns its one guided velocity twice: it is the CFG
        return v_c
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + cfg_scale * (v_c - v_u)


def sde_mask(start: torch.Tensor, num_steps: int, window_size: int) -> torch.Tensor:
    """``[N, n]`` bool: which sampler steps of each row are SDE steps (all without a window)."""
    steps = torch.arange(num_steps, device=start.device).unsqueeze(1)
    if window_size <= 0:
        return torch.ones((num_steps, start.numel()), dtype=torch.bool, device=start.device)
    return (steps >= start.unsqueeze(0)) & (steps < (start + window_size).unsqueeze(0))


@torch.no_grad()
def sde_rollout(model: Any, cond: Cond, x_init: torch.Tensor, xi: torch.Tensor, sigmas: torch.Tensor, cfg, *,
                start: torch.Tensor, num_train: int, chunk: int, kernel_backend: str = "auto") -> Trajectories:
    """Sample ``x_init`` [n, ...] (noise at ``sigmas[0] = 1``) with the policy and store the trained steps.

    ``xi`` [N, n, ...] the per-step SDE noise; ``start`` [n] the first trained (and, with ``cfg.window_size``, the
    first SDE) step of each row; ``chunk`` rows per sampler call, in order (the training micro-batch, so the
    first micro-step's forwards see exactly the rollout's batches: ratio exactly 1). Step i of row r:
    ``x_next = a x + b v + noise xi`` with the SDE coefficients of ``cfg.sde_type`` on SDE steps and the Euler ODE
    elsewhere (fp32 state); its log-prob is ``kernels.grpo_logprob`` (the training loss's own sums).
    """
    n, num_steps, dev = x_init.shape[0], sigmas.numel() - 1, x_init.device
    sig = sigmas.to(dev, torch.float32)
    # the official code uses the table's second entry in the denominator at sigma = 1
    coef_sde = grpo_coefficients(sig[:-1], sig[1:], noise_level=cfg.noise_level, sde_type=cfg.sde_type,
                                 sigma_max=sig[1])
    coef_ode = grpo_ode_coefficients(sig[:-1], sig[1:])
    start_host = start.cpu()  # where each row trains is known on the host: no device reads in the step loop
    start = start.to(dev)
    is_sde = sde_mask(start, num_steps, cfg.window_size)                      # [N, n]
    shape = tuple(x_init.shape[1:])
    latents = torch.zeros((num_train + 1, n, *shape), dtype=torch.float32, device=dev)
    log_probs = torch.zeros((num_train, n), dtype=torch.float32, device=dev)
    coef = torch.zeros((num_train, n, coef_sde.shape[1]), dtype=torch.float32, device=dev)
    sigma_k = torch.zeros((num_train, n), dtype=torch.float32, device=dev)
    finals = []
    for a in range(0, n, chunk):
        sl = slice(a, min(a + chunk, n))
        c, m = cond.index(sl), sl.stop - sl.start
        trained = start_host[sl]
        x = x_init[sl].float()
        for i in range(num_steps):
            coef_i = torch.where(is_sde[i, sl].unsqueeze(1), coef_sde[i], coef_ode[i])
            s_i = sig[i].expand(m)
            v = velocity_for(model, x, s_i, c, cfg.cfg_scale, "policy")
            x_next = grpo_step(x, v, coef_i, xi[i, sl])
            k = i - trained                                                    # trained index of step i per row
            local = torch.nonzero((k >= 0) & (k < num_train)).squeeze(1)
            if local.numel():
                lp = kernels.grpo_logprob(v, x, x_next, coef_i, backend=kernel_backend)
                kk, rows, loc = k[local].to(dev), (local + a).to(dev), local.to(dev)
                latents[kk, rows] = x[loc]
                log_probs[kk, rows] = lp[loc]
                coef[kk, rows] = coef_i[loc]
                sigma_k[kk, rows] = s_i[loc]
                last = kk == num_train - 1
                latents[num_train, rows[last]] = x_next[loc[last]]
            x = x_next
        finals.append(x)
    return Trajectories(latents=latents, log_probs=log_probs, coef=coef, sigma=sigma_k, start=start,
                        x_final=torch.cat(finals))
