"""FDFO in the engine loop (``--method fdfo``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import kernels
from engine.errors import ConfigError
from engine.methods import Method, register
from engine.methods.common import check_bad_rewards
from engine.methods.fdfo.config import FDFOConfig
from engine.methods.fdfo.rollout import paired_rollout
from engine.methods.fdfo.update import fdfo_update
from engine.streams import Stream
from models.base import Cond


@dataclass
class FDFOTargets:
    """What ``advantages`` hands to ``update``: per local row ``dR`` [2P] and ``dxh`` [2P, ...]; epoch metrics."""

    dR: torch.Tensor
    dxh: torch.Tensor
    metrics: dict


@register("fdfo")
class FDFOMethod(Method):
    """FDFO in the engine loop (``--method fdfo``): rollout -> rewards -> finite-difference pairs -> SPO updates."""

    Config = FDFOConfig
    adapters = ("policy",)
    exact_groups = False

    def rollout(self, ctx, batch):
        from engine.rollout import rank_samples, sample_noise

        cfg, o = ctx.cfg, self.opt
        ro = rank_samples(ctx, batch)
        if len(ro) % 2 or not torch.equal(ro.prompt_idx[0::2], ro.prompt_idx[1::2]):
            raise ConfigError("FDFO needs both branches of a pair on one rank: set data.group_size=2 and an even "
                              "train.micro_batch_size")
        shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
        dev = ctx.dist.device
        pair_idx = ro.global_idx[0::2] // 2  # the shared initial noise is keyed by the pair (global prompt slot)
        x_init = sample_noise(pair_idx, shape, seed=cfg.seed, epoch=ro.epoch, stream=Stream.INIT_NOISE,
                              device=dev)
        xi = sample_noise(ro.global_idx, (o.num_steps, *shape), seed=cfg.seed, epoch=ro.epoch,
                          stream=Stream.FDFO_CHURN, device=dev).transpose(0, 1)
        sigmas = ctx.model.sigmas(o.num_steps).to(dev, torch.float32)
        data = paired_rollout(ctx.model, ro.cond.index(slice(0, None, 2)), x_init, o, xi=xi, sigmas=sigmas,
                              batch_pairs=max(1, cfg.rollout.batch_size // 2))
        ro.x0 = data.x_final
        ro.extras["pairs"] = data
        return ro

    def advantages(self, ctx, ro, scores) -> FDFOTargets:
        """Raw rewards -> (dR, dxh). A pair with a NaN/failed reward on either branch gets dR = 0 (no update);
        above ``train.max_bad_reward_fraction`` of the epoch's samples the run aborts."""

        dist, dev = ctx.dist, ctx.dist.device
        if scores["reward"].shape != (len(ro.x0),):
            raise ValueError(f"FDFO: rewards must have shape ({len(ro.x0)},) (one per branch), got "
                             f"{tuple(scores['reward'].shape)}")
        reward = scores["reward"].to(dev, torch.float32)
        valid = scores.get("valid", torch.isfinite(reward)).to(dev).bool() & torch.isfinite(reward)
        pair_ok = (valid[0::2] & valid[1::2]).repeat_interleave(2)
        safe = torch.where(pair_ok, reward, torch.zeros_like(reward))
        ok = pair_ok.double()
        sums = dist.all_reduce_sum(torch.stack([(~valid).sum().double(), (~pair_ok).sum().double(),
                                                (safe * ok).sum(), (safe.square() * ok).sum(), ok.sum()])).tolist()
        n_bad, n_dropped, s, sq, n_ok = sums
        check_bad_rewards(ctx, int(n_bad), ro.epoch, lambda: f"{int(n_dropped)} branches (whole pairs) get no update")
        dR, dxh = kernels.fdfo_pairs(ro.x0, safe, backend=ctx.cfg.train.kernel_backend)
        mean = s / max(n_ok, 1)
        metrics = {"reward/mean": mean, "reward/std": math.sqrt(max(sq / max(n_ok, 1) - mean * mean, 0.0)),
                   "reward/bad_samples": n_bad, "reward/dropped_samples": n_dropped}
        for k, v in scores.items():
            if k in ("reward", "valid") or not torch.is_tensor(v) or not v.is_floating_point():
                continue
            t = dist.all_reduce_sum(torch.stack([(torch.nan_to_num(v.to(dev).double()) * pair_ok).sum(),
                                                 pair_ok.sum().double()]))
            metrics[f"reward/{k}/mean"] = float(t[0] / t[1].clamp_min(1))
        return FDFOTargets(dR=dR, dxh=dxh, metrics=metrics)

    @torch.no_grad()
    def eval_sample(self, ctx, noise: torch.Tensor, cond: Cond, adapter: str = "policy") -> torch.Tensor:
        """Evaluation samples as FDFO samples them, without churn: the Euler ODE over ``fdfo.num_steps`` of the
        model's schedule with ``fdfo.cfg_scale`` (a hook for the engine's evaluation)."""
        from models.samplers import sample_ode

        sigmas = ctx.model.sigmas(self.opt.num_steps).to(noise.device, torch.float32)
        return sample_ode(ctx.model, noise, cond, sigmas, adapter=adapter, cfg_scale=self.opt.cfg_scale)

    def update(self, ctx, ro, adv: FDFOTargets) -> list[dict]:
        layout = ctx.layout
        rank_rows = [layout.rank_indices(r) for r in range(layout.world_size)]
        steps = fdfo_update(ctx.model, ro.extras["pairs"], adv.dR, adv.dxh, ctx.stepper, self.opt,
                            rank_rows=rank_rows, rank=ctx.dist.rank, gradient_steps=layout.gradient_steps,
                            seed=ctx.cfg.seed, epoch=ro.epoch, kernel_backend=ctx.cfg.train.kernel_backend)
        results = []
        for stats, step_metrics in steps:
            metrics = stats.reduce(ctx.dist)
            metrics.update(step_metrics)
            results.append(metrics)
        return results
