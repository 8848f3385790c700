"""Flow-GRPO in the engine loop (``--method grpo``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.methods import Method, register
from engine.methods.common import check_bad_rewards
from engine.methods.grpo.config import GRPOConfig
from engine.methods.grpo.rollout import sde_rollout
from engine.methods.grpo.update import grpo_update
from engine.streams import Stream
from models.base import Cond


@dataclass
class GRPOAdvantages:
    """Per local sample: ``adv`` (clipped at ``adv_clip``; 0 for dropped groups) and ``keep``; epoch metrics."""

    adv: torch.Tensor
    keep: torch.Tensor
    metrics: dict


@register("grpo")
class GRPOMethod(Method):
    """Flow-GRPO (``--method grpo``): SDE rollouts with per-step log-probs -> grouped advantages -> PPO steps."""

    Config = GRPOConfig
    adapters = ("policy",)
    exact_groups = False  # advantages are centered once per epoch over the gathered rewards, not inside the loss

    def rollout(self, ctx, batch):
        from engine.rollout import rank_samples, sample_noise, sample_subsets

        cfg, o = ctx.cfg, self.opt
        ro = rank_samples(ctx, batch)
        n_steps = cfg.rollout.num_steps
        shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
        dev = ctx.dist.device
        x_init = sample_noise(ro.global_idx, shape, seed=cfg.seed, epoch=ro.epoch, stream=Stream.INIT_NOISE,
                              device=dev)
        xi = sample_noise(ro.global_idx, (n_steps, *shape), seed=cfg.seed, epoch=ro.epoch,
                          stream=Stream.GRPO_SDE_NOISE, device=dev).transpose(0, 1)
        if o.window_size > 0:
            lo, hi = o.window(n_steps)
            start = lo + sample_subsets(ro.global_idx, hi - o.window_size - lo + 1, 1, seed=cfg.seed,
                                        epoch=ro.epoch, stream=Stream.GRPO_WINDOW)[:, 0]
        else:
            start = torch.zeros(len(ro), dtype=torch.long)
        traj = sde_rollout(ctx.model, ro.cond, x_init, xi, ctx.sigmas(), o, start=start,
                           num_train=o.train_steps(cfg), chunk=ctx.layout.micro_batch_size,
                           kernel_backend=cfg.train.kernel_backend)
        ro.x0 = traj.x_final
        ro.extras["trajectories"] = traj
        return ro

    def advantages(self, ctx, ro, scores) -> GRPOAdvantages:
        """Per-prompt advantages over ALL ranks' rewards (gathered detached scalars): ``(R - mean_g R) / (std +
        1e-4)``, std global or per group (the official ``stat_tracking.py``), clipped at ``adv_clip``. A group with a
        NaN/failed reward leaves the update; above ``train.max_bad_reward_fraction`` of the epoch the run aborts."""
        dist, layout = ctx.dist, ctx.layout
        dev = dist.device
        reward = scores["reward"].to(dev, torch.float32)
        valid = scores.get("valid", torch.isfinite(reward)).to(dev).bool() & torch.isfinite(reward)
        R = dist.gather_samples(reward, layout)
        V = dist.gather_samples(valid, layout)
        G = dist.gather_samples(ro.group_ids.to(dev), layout)
        bad_group = torch.zeros(int(G.max()) + 1, dtype=torch.bool, device=dev).index_fill_(0, G[~V], True)
        keep_all = ~bad_group[G]
        n_bad = int((~V).sum())
        check_bad_rewards(ctx, n_bad, ro.epoch, lambda: f"dropping {int((~keep_all).sum())} samples (their whole "
                                                        f"groups) from the update")
        adv_all = torch.zeros_like(R)
        metrics = {"reward/bad_samples": float(n_bad), "reward/dropped_samples": float((~keep_all).sum())}
        if keep_all.any():
            Rk = R[keep_all]
            adv, _, stats = kernels.group_advantages(Rk, G[keep_all], global_std=self.opt.global_std,
                                                     adv_clip=self.opt.adv_clip, std_floor="additive",
                                                     backend=ctx.cfg.train.kernel_backend)
            adv_all[keep_all] = adv
            metrics.update({"zero_std_fraction": float(stats["zero_std_fraction"]),
                            "reward/mean": float(Rk.mean()), "reward/std": float(Rk.std(unbiased=False)),
                            "advantage/abs_mean": float(adv.abs().mean())})
            for k, v in scores.items():
                if k in ("reward", "valid") or not torch.is_tensor(v) or not v.is_floating_point():
                    continue
                comp = dist.gather_samples(v.to(dev, torch.float32), layout)[keep_all]
                metrics[f"reward/{k}/mean"] = float(comp.mean())
        mine = layout.rank_indices(dist.rank).to(dev)
        return GRPOAdvantages(adv=adv_all[mine], keep=keep_all[mine], metrics=metrics)

    def update(self, ctx, ro, adv: GRPOAdvantages) -> list[dict]:
        steps = grpo_update(ctx.model, ro.extras["trajectories"], ro.cond, adv.adv, adv.keep, ctx.stepper, self.opt,
                            ctx.layout, kernel_backend=ctx.cfg.train.kernel_backend)
        results = []
        for stats, step_metrics in steps:
            metrics = stats.reduce(ctx.dist)
            metrics.update(step_metrics)
            results.append(metrics)
        return results

    @torch.no_grad()
    def eval_sample(self, ctx, noise: torch.Tensor, cond: Cond, adapter: str = "policy") -> torch.Tensor:
        """Evaluation samples as the official evaluation draws them: the deterministic ODE (noise level 0) over
        ``rollout.num_steps`` with ``grpo.cfg_scale``."""
        from models.samplers import sample_ode
        return sample_ode(ctx.model, noise, cond, ctx.sigmas(), adapter=adapter, cfg_scale=self.opt.cfg_scale)

