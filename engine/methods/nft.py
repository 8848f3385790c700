"""NFT: the DiffusionNFT baseline (methods.md section 3), kept for side-by-side comparison with CRD.

One ``old`` snapshot is both the sampler and the reference. Per epoch: rollout with ``old`` (deterministic ODE,
x0 only); grouped advantages -> ``r_i``; K timesteps per sample with stored eps; ``v_old`` once before any update;
per micro-step ``v`` (policy), ``v_pre`` (pretrained, no CFG) and ``kernels.nft_loss``
``L = A_max mean(r L_pos + (1 - r) L_neg) / beta_nft + kl_beta mean mean_pix (v - v_pre)^2``;
then ``old <- lam(s) old + (1 - lam(s)) theta`` with ``lam(s) = min(0.001 s, 0.5)`` (schedule "0-0.0-0.001-0.5").

Defaults follow the official DiffusionNFT trainer (github NVlabs/DiffusionNFT), so the baseline reproduces it:
- ``nft.std_floor: additive``: ``A = (R - mean_g R) / (std + 1e-4)`` (``flow_grpo/stat_tracking.py`` lines 28 and
  30-31) instead of CRD's ``max(std, 1e-6)`` (``max``); the logged ``advantage/std`` is the divisor ``std + 1e-4``;
- ``nft.timestep_choice: official``: per sample, K = ``int(N * train.timestep_fraction)`` distinct sampler sigmas
  drawn from ALL N (the cleanest included; ``scripts/train_nft_sd3.py`` lines 569, 662, 810-816, 854-864: a
  per-sample ``randperm`` of the N scheduler timesteps, its first K columns) instead of ``fraction`` (K of the
  ``int(N * fraction)`` noisiest: the cleanest excluded). See :func:`engine.methods.common.draw_points`, which also
  reads ``train.timestep_sharing`` / ``train.timestep_sampling`` (defaults: per sample, table entries).
"""
from __future__ import annotations

from dataclasses import dataclass

import kernels
from engine.errors import ConfigError
from engine.methods import Method, register
from engine.methods.common import TIMESTEP_CHOICES, forward_process_update, grouped_advantages
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
    std_floor: str = opt("additive", "std floor of the advantages: additive (R - mean) / (std + 1e-4), the official "
                                     "DiffusionNFT trainer's | max (R - mean) / max(std, 1e-6), CRD's")
    timestep_choice: str = opt("official", "training sigmas per sample: official (K = int(N * "
                                           "train.timestep_fraction) distinct ones of ALL N sampler sigmas, the "
                                           "cleanest included: the official trainer's) | fraction (K of the "
                                           "int(N * fraction) noisiest, CRD's)")

    def validate(self, cfg) -> None:
        if self.beta <= 0 or self.adv_clip <= 0:
            raise ConfigError("config keys 'nft.beta' and 'nft.adv_clip' must be > 0")
        if self.kl_beta < 0:
            raise ConfigError("config key 'nft.kl_beta' must be >= 0")
        if cfg.eval.adapter == "ema":
            raise ConfigError("config key 'eval.adapter' is 'ema' but NFT keeps no eval EMA (use policy)")
        Schedule.parse(self.old_schedule, "nft.old_schedule")
        if self.std_floor not in ("additive", "max"):
            raise ConfigError(f"config key 'nft.std_floor' must be additive or max, got {self.std_floor!r}")
        if self.timestep_choice not in TIMESTEP_CHOICES:
            raise ConfigError(f"config key 'nft.timestep_choice' must be official or fraction, "
                              f"got {self.timestep_choice!r}")


@register("nft")
class NFT(Method):
    Config = NFTConfig
    adapters = ("policy", "old")

    def schedules(self) -> dict[str, Schedule]:
        return {"old": Schedule.parse(self.opt.old_schedule, "nft.old_schedule")}

    def rollout(self, ctx, batch):
        return ode_rollout(ctx, batch, adapter="old")

    def advantages(self, ctx, ro, scores):
        return grouped_advantages(ctx, ro, scores, global_std=self.opt.global_std, adv_clip=self.opt.adv_clip,
                                  std_floor=self.opt.std_floor)

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
