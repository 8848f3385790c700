"""CRD: Centered Reward Distillation (methods.md section 2), the headline method.

Per epoch:
1. rollout: P prompts x G samples with theta_samp (``sampler`` adapter), deterministic Euler ODE, N steps, no CFG,
   keep x0 only;
2. rewards -> ``r_i`` (grouped advantages over all ranks);
3. K training timesteps per sample (random subset of the sampler's sigmas, excluding the cleanest
   ``1 - timestep_fraction``), one fresh eps per (sample, timestep), stored;
4. ``v_old`` for every stored (sample, timestep) ONCE, under no grad, before any update (same micro-batch layout);
5. per micro-batch and timestep: ``v`` (policy, grad), the CFG anchor's cond+uncond passes as one batch
   (``pretrained``), ``kernels.crd_loss`` (exact group centering, adaptive KL), backward (DeepSpeed scales by
   1/accumulation), clip 1.0, AdamW; ``gradient_steps_per_epoch`` optimizer steps;
6. EMA of theta_old and theta_samp with their schedules (``Method.snapshot_update``).

Group centering: when every rank's micro-batch holds whole groups the fused kernel centers locally. When groups
straddle ranks (``W * m`` a multiple of G but ``m`` not), or with ``centering: batch`` on several ranks, the kernel
gets a ``group_mean_fn`` (:func:`gathered_group_mean`) that all-gathers the detached per-sample scalars over the
global micro-batch, so the centering uses global means.

Timestep stacking (``train.stack_timesteps``, default off): a micro-batch's K timesteps go through the policy, the
CFG anchor and the snapshot pass as ONE batch of K*m rows; the loss is still computed per (micro-batch, timestep)
slice as the spec defines it, and the K losses are summed into one backward (DeepSpeed scales by 1/(a*K) either way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.errors import ConfigError
from engine.methods import Method, register
from engine.methods.common import forward_process_update, grouped_advantages
from engine.options import opt
from engine.rollout import ode_rollout
from engine.snapshots import Schedule

RHO_MODES = ("reward", "advantage", "batch_reward")
REWARD_SCALES = ("normalized", "raw")
RATIO_REFERENCES = ("old", "pretrained")
LOG_RATIOS = ("adaptive", "elbo")


@dataclass
class CRDConfig:
    """CRD options (YAML section ``crd``)."""

    beta: float = opt(1.0, "temperature of the target p_ref exp(r / beta): with reward_scale normalized r = 0.5 + "
                           "clip(A)/(2 adv_clip), so in reward units the fixed point's temperature is beta_eff = "
                           "2 adv_clip beta std(R) (logged as crd/beta_eff); with reward_scale raw beta is in reward "
                           "units itself")
    reward_scale: str = opt("normalized", "what the loss matches: normalized (r of the grouped advantages, the first "
                                          "author's trainer: the temperature moves with std(R)) | raw (the raw reward "
                                          "R, centered per group: the target is exactly p_ref exp(R / beta))")
    ratio_reference: str = opt("old", "the log-ratio's reference: old (theta_old, the moving snapshot; the author's "
                                      "use_old_for_loss) | pretrained (the frozen pretrained model, no CFG: the target "
                                      "is then p_pretrained exp(r / beta) for every epoch)")
    log_ratio: str = opt("adaptive", "the implicit reward's estimator: adaptive (the author's: squared errors divided "
                                     "by the per-sample mean |v - u|) | elbo (the ELBO difference in nats, "
                                     "(1 - sigma)/sigma sum_pix[(v_ref - u)^2 - (v - u)^2]: the log-ratio the theory's "
                                     "fixed point p_ref exp(R / beta) is stated in)")
    adv_clip: float = opt(5.0, "A_max: advantages A = (R - mean_group R) / std(R) are clipped to [-A_max, A_max]")
    global_std: bool = opt(True, "std(R) of the advantages over the whole epoch (false: per group)")
    cfg_scale: float = opt(4.5, "w_kl: CFG scale of the pretrained anchor the KL term pulls towards")
    kl_beta: float = opt(0.1, "beta_kl: KL coefficient at rho = 1; 0 switches the KL (and the anchor's forward) off")
    kl_min: float = opt(1e-4, "beta_min: KL coefficient at rho = 0 (of the adaptive KL; unused when kl_beta = 0)")
    adaptive_kl: bool = opt(True, "reward-adaptive KL c_i = kl_min + (kl_beta - kl_min) rho_i (false: c_i = kl_beta)")
    rho: str = opt("reward", "rho_i of the adaptive KL: reward (the sample's mapped reward) | advantage | "
                             "batch_reward (the micro-batch mean)")
    reward_range: tuple = opt((0.0, 1.0), "raw reward range [low, high] mapped to [0, 1] for rho = reward / "
                                          "batch_reward")
    centering: str = opt("group", "advantage centering: group (exact, per prompt; needs whole groups per global "
                                  "micro-batch) | batch (micro-batch mean)")
    old_schedule: str = opt("0-0.25-0.005-0.999", "theta_old EMA schedule 'start-lam0-slope-lam_max': "
                                                  "lam(s) = lam0 before step start, then "
                                                  "min(lam0 + slope (s - start), lam_max)")
    sampler_schedule: str = opt("75-0.0-0.0075-0.999", "theta_samp EMA schedule (same format): the decoupled "
                                                       "rollout sampler")
    ema_schedule: str = opt("", "optional evaluation EMA schedule (same format; '' = off)")

    def validate(self, cfg) -> None:
        if self.rho not in RHO_MODES:
            raise ConfigError(f"config key 'crd.rho' must be one of {', '.join(RHO_MODES)}, got {self.rho!r}")
        if self.reward_scale not in REWARD_SCALES:
            raise ConfigError(f"config key 'crd.reward_scale' must be normalized or raw, got {self.reward_scale!r}")
        if self.ratio_reference not in RATIO_REFERENCES:
            raise ConfigError(f"config key 'crd.ratio_reference' must be old or pretrained, "
                              f"got {self.ratio_reference!r}")
        if self.log_ratio not in LOG_RATIOS:
            raise ConfigError(f"config key 'crd.log_ratio' must be adaptive or elbo, got {self.log_ratio!r}")
        if self.centering not in ("group", "batch"):
            raise ConfigError(f"config key 'crd.centering' must be group or batch, got {self.centering!r}")
        if self.beta <= 0 or self.adv_clip <= 0:
            raise ConfigError("config keys 'crd.beta' and 'crd.adv_clip' must be > 0")
        if self.kl_beta < 0 or self.kl_min < 0:
            raise ConfigError("config keys 'crd.kl_beta' and 'crd.kl_min' must be >= 0")
        if len(self.reward_range) != 2 or not self.reward_range[1] > self.reward_range[0]:
            raise ConfigError(f"config key 'crd.reward_range' must be [low, high] with high > low, "
                              f"got {self.reward_range!r}")
        if cfg.eval.adapter == "ema" and not self.ema_schedule:
            raise ConfigError("config key 'eval.adapter' is 'ema' but 'crd.ema_schedule' is empty (no eval EMA)")
        for key in ("old_schedule", "sampler_schedule") + (("ema_schedule",) if self.ema_schedule else ()):
            Schedule.parse(getattr(self, key), f"crd.{key}")


@register("crd")
class CRD(Method):
    Config = CRDConfig
    exact_groups = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.exact_groups = self.opt.centering == "group"
        # the log-ratio's reference: the moving snapshot theta_old, or the frozen pretrained model (no old kept)
        self.reference = self.opt.ratio_reference  # the adapter name: "old" or "pretrained"
        self.adapters = (("policy", "old", "sampler") if self.reference == "old" else ("policy", "sampler")) + \
            (("ema",) if self.opt.ema_schedule else ())

    def schedules(self) -> dict[str, Schedule]:
        o = self.opt
        out = {"sampler": Schedule.parse(o.sampler_schedule, "crd.sampler_schedule")}
        if self.reference == "old":
            out = {"old": Schedule.parse(o.old_schedule, "crd.old_schedule"), **out}
        if o.ema_schedule:
            out["ema"] = Schedule.parse(o.ema_schedule, "crd.ema_schedule")
        return out

    # 1. rollout with theta_samp
    def rollout(self, ctx, batch):
        return ode_rollout(ctx, batch, adapter="sampler")

    # 2. rewards -> r_i (and rho for the adaptive KL)
    def advantages(self, ctx, ro, scores):
        o = self.opt
        adv = grouped_advantages(ctx, ro, scores, global_std=o.global_std, adv_clip=o.adv_clip,
                                 rho_mode=o.rho if o.adaptive_kl else "advantage",
                                 reward_range=tuple(o.reward_range))
        if o.reward_scale == "raw":  # the loss centers R itself per group: the target is p_ref exp(R / beta)
            adv.raw = torch.nan_to_num(scores["reward"].to(ctx.dist.device, torch.float32), nan=0.0)
            adv.metrics["crd/beta_eff"] = o.beta
        elif "advantage/std" in adv.metrics:
            # the target is p_ref exp(r / beta) in the normalised r = 0.5 + clip(A)/(2 A_max), A = (R - mean)/std:
            # in reward units p_ref exp(R / beta_eff), beta_eff = 2 A_max beta std(R) (with per-group std: the mean)
            adv.metrics["crd/beta_eff"] = 2 * o.adv_clip * o.beta * adv.metrics["advantage/std"]
        return adv

    def update(self, ctx, ro, adv) -> list[dict]:
        o, layout, dist = self.opt, ctx.layout, ctx.dist
        rho = adv.rho if o.adaptive_kl else torch.ones_like(adv.rho)  # c_i = kl_beta when not adaptive
        reward = adv.raw if o.reward_scale == "raw" else adv.r01
        # kl_beta = 0 means no KL at all, so kl_min (the adaptive floor) must not keep a (1 - rho) anchor alive
        need_anchor = o.kl_beta > 0
        kl_min = o.kl_min if need_anchor else 0.0
        local_centering = layout.groups_local if o.centering == "group" else dist.world_size == 1

        def anchor(mb, v_all):
            if need_anchor:  # cond + uncond rows of every covered timestep in one batch
                return ctx.model.velocity_cfg_pair(mb.x_t, mb.sigma, mb.cond, adapter="pretrained")
            return v_all.detach(), v_all.detach()  # every KL coefficient is 0: the anchor changes nothing

        def loss(t):
            sl = t.rows
            v_pc, v_pu = (t.part(a) for a in t.anchor)
            args = t.kept(t.v, t.v_old, t.part(t.mb.u), v_pc, v_pu, reward[sl], rho[sl], ro.group_ids[sl])
            weight = None if o.log_ratio == "adaptive" else t.kept(elbo_weight(t.part(t.mb.sigma), t.v))[0]
            # centering over the global micro-batch (groups straddling ranks): group means of detached scalars
            # gathered from every rank (a collective: every rank calls it)
            mean_fn = None if local_centering else gathered_group_mean(dist, sl.stop - sl.start, t.keep,
                                                                       by_group=o.centering == "group")
            if args[0].shape[0] == 0:  # nothing kept here (still joins the other ranks' gather)
                if mean_fn is not None:
                    mean_fn(args[0].new_zeros(0, 2, dtype=torch.float32), args[7])
                return t.v.sum() * 0.0, {}
            value, st = kernels.crd_loss(*args, ratio_weight=weight, beta=o.beta, adv_clip=o.adv_clip,
                                         cfg_scale=o.cfg_scale, kl_beta=o.kl_beta, kl_min=kl_min,
                                         centering="group" if mean_fn else o.centering, group_mean_fn=mean_fn,
                                         backend=ctx.cfg.train.kernel_backend)
            logged = {name: st[name] for name in ("log_ratio", "kl", "kl_coef", "lc") if name in st}
            if need_anchor:  # how far the reference has moved from the anchor: mean_pix (v_ref - v_cfg)^2
                v_cfg = kernels.reference.cfg_combine(args[3], args[4], o.cfg_scale)
                logged["kl_old_anchor"] = (args[1].float() - v_cfg.float()).square().flatten(1).mean(1)
            if "log_ratio" in st:
                logged["old_deviation"] = (t.v_old - t.v.detach()).float().square().flatten(1).mean(1)
                if t.first:  # theta vs theta_old on the epoch's first micro-step
                    logged["log_ratio_first_micro_step"] = st["log_ratio"]
            return value, logged

        # 3.-5. K stored timesteps, v_old once, micro-steps (engine.methods.common)
        return forward_process_update(ctx, ro, adv, anchor=anchor, loss=loss, reference=self.reference)


def elbo_weight(sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``w = sigma / ((1 - sigma) D)`` per row: with it ``kernels.crd_loss``'s ``l = mean_pix[...] / w`` is the ELBO
    difference ``(1 - sigma)/sigma sum_pix[(v_ref - u)^2 - (v - u)^2]`` (VDM's weighting ``-d log SNR / 2`` of the
    eps error, ``eps_hat - eps = (1 - sigma)(v - u)``), an estimate of ``log p_theta(x0) - log p_ref(x0)`` in nats
    (unbiased under ``train.timestep_sampling: uniform``). ``1 - sigma`` is floored at 1e-3 (sigma = 1 carries no
    information: its weight is then ~0)."""
    d = v[0].numel()
    s = sigma.float().reshape(-1)
    return s / ((1 - s).clamp_min(1e-3) * d)


def gathered_group_mean(dist, rows: int, keep: torch.Tensor | None, *, by_group: bool):
    """A ``kernels.crd_loss`` ``group_mean_fn`` centering over the GLOBAL micro-batch (all ranks, one timestep).

    Every rank holds ``rows`` samples of the micro-batch, of which ``keep`` (``None``: all) enter the loss. The
    kept samples' detached scalars (log-ratio, r) and group ids go into a fixed ``[rows, 4]`` float64 buffer
    (ids exact up to 2^53; a kept flag, so ranks with different kept counts gather equal shapes), ONE all-gather,
    then each local sample's mean over the kept samples of its group (``by_group``) or of the whole global
    micro-batch (``centering: batch``). Dropped samples count nowhere, as in the local path.
    """
    def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(rows, 4, dtype=torch.float64, device=values.device)
        idx = torch.arange(rows, device=values.device) if keep is None else keep
        buf[idx, :2] = values.detach().double()
        buf[idx, 2] = group_ids.double() if by_group else 0.0
        buf[idx, 3] = 1.0
        every = dist.all_gather(buf).reshape(-1, 4)  # [W * rows, 4]
        mine = group_ids.double() if by_group else torch.zeros_like(group_ids, dtype=torch.float64)
        same = (mine.unsqueeze(1) == every[:, 2].unsqueeze(0)).double() * every[:, 3].unsqueeze(0)
        return ((same @ every[:, :2]) / same.sum(1, keepdim=True).clamp_min(1)).to(values.dtype)
    return group_mean
