"""Pieces the methods share: the bad-reward policy; for CRD and NFT grouped advantages over all ranks, the K
training timesteps with stored noise, the snapshot velocities computed once per epoch, and the one micro-step
skeleton (:func:`forward_process_update`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

import kernels
from kernels.reference import STD_FLOOR
from engine.batch import eligible_timesteps
from engine.nvtx_ranges import nvtx_range
from engine.runlog import StepStats
from engine.rollout import sample_noise, sample_subsets
from engine.streams import Stream
from models.base import Cond


class RewardFailure(RuntimeError):
    """Too many samples of an epoch had NaN or failing rewards (``train.max_bad_reward_fraction``)."""


def check_bad_rewards(ctx, n_bad: int, epoch: int, dropped) -> None:
    """The one bad-reward policy of every method: when more than ``train.max_bad_reward_fraction`` of the epoch's
    samples have a NaN/failed reward the run aborts (:class:`RewardFailure`); below it rank 0 warns and the method
    leaves the affected samples out (``dropped()`` says how: whole groups, whole pairs)."""
    total, limit = ctx.layout.samples_per_epoch, ctx.cfg.train.max_bad_reward_fraction
    frac = n_bad / total
    if frac > limit:
        raise RewardFailure(f"{n_bad} of {total} rewards in epoch {epoch} are NaN or failed ({frac:.0%} > "
                            f"train.max_bad_reward_fraction={limit}); last reward errors: "
                            f"{getattr(ctx.rewards, 'last_errors', {})}")
    if n_bad and ctx.dist.is_main:
        warnings.warn(f"epoch {epoch}: {n_bad} NaN/failed rewards; {dropped()}", RuntimeWarning, stacklevel=3)


@dataclass
class Advantages:
    """Per local sample (processing order): ``r01`` in [0,1], ``rc`` = r01 minus its group mean, ``rho`` the
    adaptive-KL signal, ``keep`` (False for samples of groups dropped for a bad reward); plus epoch metrics."""

    r01: torch.Tensor
    rc: torch.Tensor
    rho: torch.Tensor
    keep: torch.Tensor
    all_keep: bool
    metrics: dict


def grouped_advantages(ctx, ro, scores: dict, *, global_std: bool, adv_clip: float, rho_mode: str = "advantage",
                       reward_range: tuple[float, float] = (0.0, 1.0)) -> Advantages:
    """Section 1 over ALL ranks' samples (gathered detached scalars), then this rank's slice.

    Samples whose reward is NaN or failed drop their whole group from the update (counted, warned); above
    ``train.max_bad_reward_fraction`` of the epoch's samples the run aborts with :class:`RewardFailure`.
    """
    dist, layout = ctx.dist, ctx.layout
    dev = dist.device
    reward = scores["reward"].to(dev, torch.float32)
    valid = scores.get("valid", torch.isfinite(reward)).to(dev) & torch.isfinite(reward)
    R = dist.gather_samples(reward, layout)
    V = dist.gather_samples(valid, layout)
    G_ids = dist.gather_samples(ro.group_ids.to(dev), layout)
    # a group is kept only when every member has a valid reward
    bad_group = torch.zeros(int(G_ids.max()) + 1, dtype=torch.bool, device=dev).index_fill_(0, G_ids[~V], True)
    keep_all = ~bad_group[G_ids]
    n_bad = int((~V).sum())
    check_bad_rewards(ctx, n_bad, ro.epoch, lambda: f"dropping {int((~keep_all).sum())} samples (their whole "
                                                    f"groups) from the update")
    r01_all = torch.full_like(R, 0.5)
    rc_all = torch.zeros_like(R)
    metrics = {"reward/bad_samples": float(n_bad), "reward/dropped_samples": float((~keep_all).sum())}
    Rk = R[keep_all]
    if Rk.numel():
        with nvtx_range("advantages/group"):
            _, r01, stats = kernels.group_advantages(Rk, G_ids[keep_all], global_std=global_std, adv_clip=adv_clip,
                                                     backend=ctx.cfg.train.kernel_backend)
        r01_all[keep_all] = r01
        inv = stats["group_index"]
        gsum = torch.zeros_like(r01).index_add_(0, inv, r01)
        gcnt = torch.zeros_like(r01).index_add_(0, inv, torch.ones_like(r01))
        rc_all[keep_all] = r01 - (gsum / gcnt.clamp_min(1))[inv]
        metrics["zero_std_fraction"] = float(stats["zero_std_fraction"])
        # the std(R) that divides the advantages (global, or each sample's group's; floored as the kernel does):
        # it sets the temperature of the fixed point in reward units (CRD logs crd/beta_eff from it)
        metrics["advantage/std"] = float(stats["std"].clamp_min(STD_FLOOR).mean())
        metrics["reward/mean"] = float(Rk.mean())
        metrics["reward/std"] = float(Rk.std(unbiased=False))
        for k, v in scores.items():  # every component's mean/std (logged once per epoch)
            if k in ("reward", "valid") or not torch.is_tensor(v) or not v.is_floating_point():
                continue
            comp = dist.gather_samples(v.to(dev, torch.float32), layout)[keep_all]
            metrics[f"reward/{k}/mean"] = float(comp.mean())
            metrics[f"reward/{k}/std"] = float(comp.std(unbiased=False))
    lo, hi = reward_range
    scaled = ((R - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.5)
    if rho_mode == "advantage":
        rho_all = r01_all
    elif rho_mode == "reward":
        rho_all = scaled
    else:  # batch_reward: the epoch batch's mean scaled reward, one value for everyone
        rho_all = (scaled[keep_all].mean() if keep_all.any() else scaled.mean()).expand_as(scaled).clone()
    mine = layout.rank_indices(dist.rank).to(dev)
    keep = keep_all[mine]
    return Advantages(r01=r01_all[mine], rc=rc_all[mine], rho=rho_all[mine], keep=keep,
                      all_keep=bool(keep_all.all()), metrics=metrics)


@dataclass
class TrainPoints:
    """Per local sample and training timestep k: ``sigma`` [n, K] (float32) and the fresh noise ``eps`` [n, K, ...]
    (drawn once, reused by the snapshot pass and every update of the epoch)."""

    sigma: torch.Tensor
    eps: torch.Tensor


def draw_points(ctx, ro) -> TrainPoints:
    """K timesteps per sample: a random subset of the sampler's own sigmas, excluding the cleanest
    ``1 - timestep_fraction`` (``int(N * fraction)`` noisiest are eligible); one fresh eps per (sample, timestep)."""
    cfg, layout = ctx.cfg, ctx.layout
    table = ctx.sigmas()
    pool = eligible_timesteps(cfg.rollout.num_steps, cfg.train.timestep_fraction)
    choice = sample_subsets(ro.global_idx, pool, layout.timesteps, seed=cfg.seed, epoch=ro.epoch,
                            stream=Stream.TIMESTEPS).to(table.device)
    shape = tuple(ro.x0.shape[1:])
    eps = sample_noise(ro.global_idx, (layout.timesteps, *shape), seed=cfg.seed, epoch=ro.epoch,
                       stream=Stream.TRAIN_NOISE, device=ro.x0.device, dtype=ro.x0.dtype)
    return TrainPoints(sigma=table[choice], eps=eps)


def noisy(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma eps`` (the one place it is computed: snapshot and policy passes agree)."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def step_slices(layout) -> list[list[slice]]:
    """Per optimizer step of an epoch, the local micro-batch row slices it covers."""
    m, a = layout.micro_batch_size, layout.micro_batches_per_step
    return [[slice((s * a + j) * m, (s * a + j + 1) * m) for j in range(a)] for s in range(layout.gradient_steps)]


@dataclass
class MicroBatch:
    """The inputs of one micro-batch at a set of timesteps, rows timestep-major (timestep ``k`` of local row ``i``
    is row ``k * m + i``): ``x_t``, ``sigma``, ``cond``, ``u = eps - x0``, and ``ks`` the timesteps it covers.
    Built by :func:`micro_batches`, the ONE place the snapshot pass and the policy pass get their batches from, so the
    first micro-step's policy forward sees exactly the batch its ``v_old`` was computed on (log-ratio exactly 0)."""

    rows: slice
    ks: tuple[int, ...]
    x_t: torch.Tensor
    sigma: torch.Tensor
    cond: object
    u: torch.Tensor

    def part(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Rows of the ``i``-th covered timestep of a stacked ``[len(ks) * m, ...]`` tensor."""
        m = t.shape[0] // len(self.ks)
        return t[i * m:(i + 1) * m]


def micro_batches(ctx, ro, pts: TrainPoints, sl: slice):
    """The micro-batch ``sl``'s (sample, timestep) inputs: ONE stacked :class:`MicroBatch` over all K timesteps when
    ``train.stack_timesteps`` (one forward/backward per micro-batch; activation memory x K), else one per timestep."""
    K = ctx.layout.timesteps
    groups = [tuple(range(K))] if ctx.cfg.train.stack_timesteps else [(k,) for k in range(K)]
    x0, cond = ro.x0[sl], ro.cond.index(sl)
    for ks in groups:
        eps = torch.cat([pts.eps[sl, k] for k in ks]) if len(ks) > 1 else pts.eps[sl, ks[0]]
        sigma = torch.cat([pts.sigma[sl, k] for k in ks]) if len(ks) > 1 else pts.sigma[sl, ks[0]]
        x0s = x0.repeat(len(ks), *([1] * (x0.ndim - 1))) if len(ks) > 1 else x0
        conds = Cond.cat([cond] * len(ks)) if len(ks) > 1 else cond
        yield MicroBatch(rows=sl, ks=ks, x_t=noisy(x0s, eps, sigma), sigma=sigma, cond=conds, u=eps - x0s)


@torch.no_grad()
def snapshot_velocities(ctx, ro, pts: TrainPoints, adapter: str) -> torch.Tensor:
    """``v_adapter(x_sigma, c, sigma)`` for every stored (sample, timestep), with the training micro-batch layout
    (:func:`micro_batches`: the first micro-step's policy forward sees exactly the same batch): ``[n, K, ...]``."""
    out = torch.empty_like(pts.eps)
    for step in step_slices(ctx.layout):
        for sl in step:
            for mb in micro_batches(ctx, ro, pts, sl):
                v = ctx.model.velocity(mb.x_t, mb.sigma, mb.cond, adapter=adapter).to(out.dtype)
                for i, k in enumerate(mb.ks):
                    out[sl, k] = mb.part(v, i)
    return out


@dataclass
class TimestepInputs:
    """One (micro-batch, timestep) of the policy pass, as a method's per-timestep loss sees it: ``mb`` the
    micro-batch, ``i``/``k`` the timestep's position in it and its index, ``v`` the policy velocity (with grad),
    ``v_old`` the stored snapshot velocity, ``anchor`` the anchor pass's outputs (whole micro-batch: slice them with
    ``part``), ``keep`` the local rows whose groups enter the loss (None: all), ``first`` the epoch's first
    micro-step (theta = theta_old there)."""

    mb: MicroBatch
    i: int
    k: int
    v: torch.Tensor
    v_old: torch.Tensor
    anchor: tuple
    keep: torch.Tensor | None
    first: bool

    @property
    def rows(self) -> slice:
        return self.mb.rows

    def part(self, t: torch.Tensor) -> torch.Tensor:
        return self.mb.part(t, self.i)

    def kept(self, *args: torch.Tensor) -> tuple:
        """``args`` restricted to the kept rows (groups with a failed reward leave the loss)."""
        return args if self.keep is None else tuple(a[self.keep] for a in args)


def forward_process_update(ctx, ro, adv: Advantages, *, anchor, loss) -> list[dict]:
    """The micro-step skeleton of the forward-process methods (CRD, NFT); per optimizer step its metrics.

    K stored timesteps per sample and their ``v_old`` once per epoch, then per optimizer step, per micro-batch
    (its K timesteps stacked into one pass, or one pass per timestep): the policy forward; ``anchor(mb, v_all)``
    under no_grad (a tuple of whole-micro-batch tensors); ``loss(t: TimestepInputs) -> (loss, {name: per-sample
    values})`` per timestep (the method's kernel and what it logs); ONE backward of the covered timesteps' summed
    losses through ``ctx.stepper``, each step's gradient the mean over its ``a * K`` micro-steps
    (``1 / layout.accumulation``).
    """
    layout = ctx.layout
    pts = draw_points(ctx, ro)
    with nvtx_range("train/old_forward"):
        v_old = snapshot_velocities(ctx, ro, pts, "old")
    keep_host = adv.keep.cpu()  # groups dropped for a bad reward (known once per epoch, on the host)
    passes = 1 if ctx.cfg.train.stack_timesteps else layout.timesteps  # micro_batches per micro-batch rows
    stats, results = StepStats(), []
    for s, step in enumerate(step_slices(layout)):
        for j, sl in enumerate(step):
            keep = None if bool(keep_host[sl].all()) else torch.nonzero(keep_host[sl]).squeeze(1).to(ro.x0.device)
            for p, mb in enumerate(micro_batches(ctx, ro, pts, sl)):
                with nvtx_range("train/policy_forward"):
                    v_all = ctx.model.velocity(mb.x_t, mb.sigma, mb.cond, adapter="policy")
                with nvtx_range("train/anchor_forward"), torch.no_grad():
                    anchors = anchor(mb, v_all)
                losses = []
                for i, k in enumerate(mb.ks):  # the spec's loss is per (micro-batch, timestep): one per slice
                    t = TimestepInputs(mb=mb, i=i, k=k, v=mb.part(v_all, i), v_old=v_old[sl, k], anchor=anchors,
                                       keep=keep, first=s == 0 and j == 0 and k == 0)
                    with nvtx_range("train/loss"):
                        value, logged = loss(t)
                    losses.append(value)
                    stats.add("loss", value.detach())
                    for name, v in logged.items():
                        stats.add(name, v)
                total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
                ctx.stepper.backward(total / layout.accumulation, last=j == len(step) - 1 and p == passes - 1)
        metrics = stats.reduce(ctx.dist)
        metrics.update(ctx.stepper.metrics())
        results.append(metrics)
    return results
