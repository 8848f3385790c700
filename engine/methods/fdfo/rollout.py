"""FDFO's paired rollout: one pair of churned-Euler trajectories per prompt from shared noise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.methods.fdfo.config import STORAGE_DTYPES, FDFOConfig
from models.base import Cond
from models.samplers import sample_fdfo_pairs


@dataclass
class PairData:
    """One rank's paired rollout: ``2P`` rows (branches, pairs on consecutive rows), ``N`` steps.

    ``states``/``velocities`` [N, 2P, ...] in the storage dtype (item (step i, row k) = ``[i, k]``); ``x_final``
    [2P, ...] fp32 (decode it for the rewards); ``sigmas`` [N + 1]; ``cond`` 2P rows (row k's prompt).
    """

    states: torch.Tensor
    velocities: torch.Tensor
    x_final: torch.Tensor
    sigmas: torch.Tensor
    cond: Cond

    @property
    def num_rows(self) -> int:
        return self.x_final.shape[0]

    @property
    def num_steps(self) -> int:
        return self.states.shape[0]


def velocity_for(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, cfg_scale: float, adapter: str
                 ) -> torch.Tensor:
    """The velocity rule of FDFO's training, the sampler's own (CFG through ``guided_velocity``)."""
    if cfg_scale == 1.0:
        return model.velocity(x, sigma, cond, adapter=adapter)
    return model.guided_velocity(x, sigma, cond, cfg_scale, adapter=adapter)


@torch.no_grad()
def paired_rollout(model: Any, cond: Cond, x_init_shared: torch.Tensor, cfg: FDFOConfig,
                   generator: torch.Generator | None = None, *, xi: torch.Tensor | None = None,
                   sigmas: torch.Tensor | None = None, batch_pairs: int = 0) -> PairData:
    """Sample one pair per prompt with the policy (``cond``, ``x_init_shared``: P rows).

    Churn noise from ``xi`` [N, 2P, ...] when given (per-sample draws), else from ``generator``. ``batch_pairs`` > 0
    splits the P prompts into sampler calls of that many pairs (rows stay in order).
    """
    if sigmas is None:
        sigmas = model.sigmas(cfg.num_steps)
    prior = None if cfg.prior_gamma < 0 else cfg.prior_gamma
    p = x_init_shared.shape[0]
    step = batch_pairs if batch_pairs > 0 else p
    parts = []
    for a in range(0, p, step):
        e = min(a + step, p)
        parts.append(sample_fdfo_pairs(model, x_init_shared[a:e], cond.index(slice(a, e)), sigmas, cfg.gammas(),
                                       generator, adapter="policy", cfg_scale=cfg.cfg_scale, prior_gamma=prior,
                                       store_dtype=STORAGE_DTYPES[cfg.storage_dtype],
                                       xi=None if xi is None else xi[:, 2 * a: 2 * e]))

    def join(name: str, dim: int) -> torch.Tensor:  # rows are dim 1 of states/velocities, dim 0 of x_final
        return torch.cat([getattr(o, name) for o in parts], dim=dim) if len(parts) > 1 else getattr(parts[0], name)

    return PairData(join("states", 1), join("velocities", 1), join("x_final", 0), parts[0].sigmas,
                    cond.repeat_interleave(2))
