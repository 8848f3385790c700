"""NFT: the DiffusionNFT baseline (methods.md section 3), kept for side-by-side comparison with CRD.

One ``old`` snapshot is both the sampler and the reference. Per epoch: rollout with ``old`` (deterministic ODE,
x0 only); grouped advantages -> ``r_i``; K timesteps per sample with stored eps; ``v_old`` once before any update;
per micro-step ``v`` (policy), ``v_pre`` (pretrained, no CFG) and ``kernels.nft_loss``
``L = A_max mean(r L_pos + (1 - r) L_neg) / beta_nft + kl_beta mean mean_pix (v - v_pre)^2``;
then ``old <- lam(s) old + (1 - lam(s)) theta`` with ``lam(s) = min(0.001 s, 0.5)`` (schedule "0-0.0-0.001-0.5").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.errors import ConfigError
from engine.runlog import StepStats
from engine.methods import Method, register
from engine.methods.common import (backward_step, draw_points, grouped_advantages, micro_batches,
                                   optimizer_step_metrics, set_boundary, snapshot_velocities, step_slices)
from engine.nvtx_ranges import nvtx_range
from engine.options import opt
from engine.rollout import ode_rollout
from engine.snapshots import Schedule


@dataclass
class NFTConfig:
    """NFT options (YAML section ``nft``)."""

    beta: float = opt(1.0, "beta_nft: scale of the implicit positive/negative policies v_old +- beta (v - v_old) "
                           "(0.1 for OCR)")
    adv_clip: float = opt(5.0, "A_max: advantages are clipped to [-A_max, A_max] before r = 0.5 + A / (2 A_max)")
    global_std: bool = opt(True, "std(R) of the advantages over the whole epoch (false: per group)")
    kl_beta: float = opt(1e-4, "weight of the KL term mean_pix (v - v_pretrained)^2 (no CFG)")
    old_schedule: str = opt("0-0.0-0.001-0.5", "theta_old EMA schedule 'start-lam0-slope-lam_max' "
                                               "(default: lam(s) = min(0.001 s, 0.5))")

    def validate(self, cfg) -> None:
        if self.beta <= 0 or self.adv_clip <= 0:
            raise ConfigError("config keys 'nft.beta' and 'nft.adv_clip' must be > 0")
        if self.kl_beta < 0:
            raise ConfigError("config key 'nft.kl_beta' must be >= 0")
        if cfg.eval.adapter == "ema":
            raise ConfigError("config key 'eval.adapter' is 'ema' but NFT keeps no eval EMA (use policy)")
        Schedule.parse(self.old_schedule, "nft.old_schedule")


@register("nft")
class NFT(Method):
    Config = NFTConfig
    adapters = ("policy", "old")

    def schedules(self) -> dict[str, Schedule]:
        return {"old": Schedule.parse(self.opt.old_schedule, "nft.old_schedule")}

    def rollout(self, ctx, batch):
        return ode_rollout(ctx, batch, adapter="old")

    def advantages(self, ctx, ro, scores):
        return grouped_advantages(ctx, ro, scores, global_std=self.opt.global_std, adv_clip=self.opt.adv_clip)

    def update(self, ctx, ro, adv) -> list[dict]:
        o, layout = self.opt, ctx.layout
        pts = draw_points(ctx, ro)
        with nvtx_range("train/old_forward"):
            v_old = snapshot_velocities(ctx, ro, pts, "old")
        keep_host = adv.keep.cpu()
        stats, results = StepStats(), []
        for s, step in enumerate(step_slices(layout)):
            for j, sl in enumerate(step):
                x0 = ro.x0[sl]
                keep = None if bool(keep_host[sl].all()) else torch.nonzero(keep_host[sl]).squeeze(1).to(x0.device)
                # per micro-batch, its K timesteps stacked into one pass (or one pass per timestep)
                for mb in micro_batches(ctx, ro, pts, sl):
                    with nvtx_range("train/policy_forward"):
                        v_all = ctx.model.velocity(mb.x_t, mb.sigma, mb.cond, adapter="policy")
                    with nvtx_range("train/anchor_forward"), torch.no_grad():
                        v_pre_all = (ctx.model.velocity(mb.x_t, mb.sigma, mb.cond, adapter="pretrained")
                                     if o.kl_beta > 0 else v_all.detach())
                    losses = []
                    for i, k in enumerate(mb.ks):  # the loss is per (micro-batch, timestep): one per slice
                        v, part = mb.part(v_all, i), (lambda t, i=i: mb.part(t, i))
                        with nvtx_range("train/loss"):
                            args = (v, v_old[sl, k], part(v_pre_all), part(mb.x_t), x0, part(mb.sigma), adv.r01[sl])
                            if keep is not None:
                                args = tuple(a[keep] for a in args)
                            if args[0].shape[0] == 0:
                                loss, st = v.sum() * 0.0, {}
                            else:
                                loss, st = kernels.nft_loss(*args, beta=o.beta, adv_clip=o.adv_clip,
                                                            kl_beta=o.kl_beta, backend=ctx.cfg.train.kernel_backend)
                        losses.append(loss)
                        stats.add("loss", loss.detach())
                        for name in ("l_pos", "l_neg", "kl"):
                            if name in st:
                                stats.add(name, st[name])
                        stats.add("old_deviation", (v_old[sl, k] - v.detach()).float().square().flatten(1).mean(1))
                    # one backward for the covered timesteps: the sum of their per-timestep losses
                    set_boundary(ctx, j == len(step) - 1)
                    backward_step(ctx, losses[0] if len(losses) == 1 else torch.stack(losses).sum())
            metrics = stats.reduce(ctx.dist)
            metrics.update(optimizer_step_metrics(ctx))
            results.append(metrics)
        return results
