"""NFT: the DiffusionNFT baseline (methods.md section 3), kept for side-by-side comparison with CRD.

One ``old`` snapshot is both the sampler and the reference. Per epoch: rollout with ``old`` (deterministic ODE,
x0 only); grouped advantages -> ``r_i``; K timesteps per sample with stored eps; ``v_old`` once before any update;
per micro-step ``v`` (policy), ``v_pre`` (pretrained, no CFG) and ``kernels.nft_loss``
``L = A_max mean(r L_pos + (1 - r) L_neg) / beta_nft + kl_beta mean mean_pix (v - v_pre)^2``;
then ``old <- lam(s) old + (1 - lam(s)) theta`` with ``lam(s) = min(0.001 s, 0.5)`` (schedule "0-0.0-0.001-0.5").
"""
from __future__ import annotations

from dataclasses import dataclass

import kernels
from engine.errors import ConfigError
from engine.methods import Method, register
from engine.methods.common import forward_process_update, grouped_advantages
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
        o = self.opt

        def anchor(mb, v_all):
            if o.kl_beta > 0:
                return (ctx.model.velocity(mb.x_t, mb.sigma, mb.cond, adapter="pretrained"),)
            return (v_all.detach(),)

        def loss(t):
            sl = t.rows
            args = t.kept(t.v, t.v_old, t.part(t.anchor[0]), t.part(t.mb.x_t), ro.x0[sl], t.part(t.mb.sigma),
                          adv.r01[sl])
            logged = {"old_deviation": (t.v_old - t.v.detach()).float().square().flatten(1).mean(1)}
            if args[0].shape[0] == 0:
                return t.v.sum() * 0.0, logged
            value, st = kernels.nft_loss(*args, beta=o.beta, adv_clip=o.adv_clip, kl_beta=o.kl_beta,
                                         backend=ctx.cfg.train.kernel_backend)
            return value, {**{name: st[name] for name in ("l_pos", "l_neg", "kl") if name in st}, **logged}

        return forward_process_update(ctx, ro, adv, anchor=anchor, loss=loss)
