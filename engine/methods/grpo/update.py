"""Flow-GRPO's update: per optimizer step, per micro-batch, per trained step one PPO-clipped micro-step."""
from __future__ import annotations

from typing import Any

import torch

import kernels
from engine.methods.common import step_slices
from engine.methods.grpo.config import GRPOConfig
from engine.methods.grpo.rollout import Trajectories, velocity_for
from engine.nvtx_ranges import nvtx_range
from engine.runlog import StepStats
from models.base import Cond

#: what each micro-step logs per kept sample (kernel stat -> metric name; the official trainer's names)
LOGGED = {"policy_loss": "policy_loss", "ratio": "ratio", "approx_kl": "approx_kl", "clipped": "clipfrac",
          "clipped_high": "clipfrac_gt_one", "clipped_low": "clipfrac_lt_one", "kl": "kl_loss"}


def grpo_update(model: Any, traj: Trajectories, cond: Cond, adv: torch.Tensor, keep: torch.Tensor, stepper: Any,
                cfg: GRPOConfig, layout: Any, *, kernel_backend: str = "auto") -> list[tuple[StepStats, dict]]:
    """``layout.gradient_steps`` optimizer steps through ``stepper``; per step (stats, ``stepper.metrics()``).

    Micro-batch j of step s covers the layout's rows; each of its ``K`` trained steps is one micro-step (the
    official loop: ``for batch: for j in range(num_train_timesteps)``), its loss the mean over the kept samples,
    scaled by ``1 / (a K)`` so the step's gradient is the mean over its micro-steps (the official accumulation over
    ``gradient_accumulation_steps * num_train_timesteps``). ``keep`` [n] bool (groups with a failed reward leave
    the loss; known on the host once per epoch). ``ratio_first_dev`` = |ratio - 1| on the epoch's first micro-step
    (exactly 0: the rollout and this forward are the same function of the same inputs).
    """
    K = traj.num_train_steps
    accumulation = layout.micro_batches_per_step * K
    keep_host = keep.cpu()
    out, first = [], True
    for step in step_slices(layout):
        stats = StepStats()
        for j, sl in enumerate(step):
            kept = None if bool(keep_host[sl].all()) else torch.nonzero(keep_host[sl]).squeeze(1).to(adv.device)
            c = cond.index(sl)
            for k in range(K):
                x_t, x_next = traj.latents[k, sl], traj.latents[k + 1, sl]
                with nvtx_range("train/policy_forward"):
                    v = velocity_for(model, x_t, traj.sigma[k, sl], c, cfg.cfg_scale, "policy", cfg.detach_uncond)
                v_ref = None
                if cfg.kl_beta > 0:
                    with nvtx_range("train/anchor_forward"), torch.no_grad():
                        v_ref = velocity_for(model, x_t, traj.sigma[k, sl], c, cfg.cfg_scale, "pretrained")
                args = [v, x_t, x_next, traj.log_probs[k, sl], adv[sl], traj.coef[k, sl], v_ref]
                if kept is not None:
                    args = [None if a is None else a[kept] for a in args]
                with nvtx_range("train/loss"):
                    if args[0].shape[0] == 0:  # every group of this micro-batch was dropped
                        loss, st = v.sum() * 0.0, {}
                    else:
                        loss, st = kernels.grpo_loss(*args[:6], v_ref=args[6], clip_range=cfg.clip_range,
                                                     adv_clip=cfg.adv_clip, kl_beta=cfg.kl_beta,
                                                     backend=kernel_backend)
                stepper.backward(loss / accumulation, last=j == len(step) - 1 and k == K - 1)
                stats.add("loss", loss.detach())
                for name, metric in LOGGED.items():
                    if name in st:
                        stats.add(metric, st[name])
                if first and "ratio" in st:
                    stats.add("ratio_first_dev", (st["ratio"].double() - 1).abs())
                    first = False
        out.append((stats, stepper.metrics()))
    return out
