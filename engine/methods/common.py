"""Pieces the methods share: the bad-reward policy; for CRD and NFT grouped advantages over all ranks, the K
training timesteps with stored noise, the snapshot velocities computed once per epoch, and the one micro-step
skeleton (:func:`forward_process_update`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

import kernels
from kernels.reference import floored_std
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
    #: the raw reward R per local sample (CRD's ``reward_scale: raw``; 0 where the reward failed), or None
    raw: torch.Tensor | None = None


def grouped_advantages(ctx, ro, scores: dict, *, global_std: bool, adv_clip: float, rho_mode: str = "advantage",
                       reward_range: tuple[float, float] = (0.0, 1.0), std_floor: str = "max") -> Advantages:
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
                                                     std_floor=std_floor, backend=ctx.cfg.train.kernel_backend)
        r01_all[keep_all] = r01
        inv = stats["group_index"]
        gsum = torch.zeros_like(r01).index_add_(0, inv, r01)
        gcnt = torch.zeros_like(r01).index_add_(0, inv, torch.ones_like(r01))
        rc_all[keep_all] = r01 - (gsum / gcnt.clamp_min(1))[inv]
        metrics["zero_std_fraction"] = float(stats["zero_std_fraction"])
        # the std(R) that divides the advantages (global, or each sample's group's; floored as the kernel does,
        # max(std, 1e-6) or std + 1e-4 by ``std_floor``): it sets the temperature of the fixed point in reward units
        # (CRD logs crd/beta_eff from it)
        metrics["advantage/std"] = float(floored_std(stats["std"], std_floor).mean())
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


#: ``timestep_choice`` of :func:`draw_points` (the method's ``timestep_choice`` option; CRD has none: fraction)
TIMESTEP_CHOICES = ("fraction", "official")
#: sigma floor of the continuous draws (``train.timestep_sampling`` uniform / logit_normal): never sigma = 0
CONTINUOUS_SIGMA_MIN = 1e-3


def eligible_pool(num_steps: int, timestep_fraction: float, choice: str) -> int:
    """How many of the sampler's sigmas (noisiest first) the draw picks from: ``int(N * fraction)`` (``fraction``)
    or all ``N`` (``official``)."""
    if choice not in TIMESTEP_CHOICES:
        raise ValueError(f"timestep_choice must be one of {TIMESTEP_CHOICES}, got {choice!r}")
    return num_steps if choice == "official" else eligible_timesteps(num_steps, timestep_fraction)


def timestep_keys(ro, layout, sharing: str) -> tuple[torch.Tensor, Stream]:
    """Per local sample, the key of its timestep draw and the stream: the global sample index (``sample``,
    ``Stream.TIMESTEPS``), the group id (``group``), or the number ``b = s * a + j`` of its GLOBAL micro-batch in
    the epoch (``micro_batch``: optimizer step ``s``, micro-batch ``j`` of the step; every rank's chunk of it
    shares ``b = global_idx // (W * m)``, see :class:`engine.batch.BatchLayout`). All three are the same on every
    rank and for any world size with the same global micro-batch, so resumed and re-sharded runs draw alike."""
    if sharing == "sample":
        return ro.global_idx, Stream.TIMESTEPS
    if sharing == "group":
        return ro.group_ids.cpu(), Stream.TIMESTEPS_GROUP
    if sharing == "micro_batch":
        return ro.global_idx.cpu() // layout.global_micro_batch, Stream.TIMESTEPS_MICRO_BATCH
    raise ValueError(f"train.timestep_sharing must be sample, group or micro_batch, got {sharing!r}")


def continuous_sigmas(keys: torch.Tensor, k: int, *, lo: float, hi: float, sampling: str, seed: int, epoch: int,
                      stream: int, logit_normal: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``[n, k]`` float32 continuous sigmas in ``[lo, hi]``, row i from the keyed normal draw ``z`` of ``keys[i]``
    (:func:`engine.rollout.sample_noise`): ``uniform`` ``lo + (hi - lo) Phi(z)`` (``Phi(z) ~ U(0, 1)`` exactly in
    distribution), ``logit_normal`` ``clamp(sigmoid(mean + std z), lo, hi)``; fp64 arithmetic, then fp32 (the
    rounding is monotone, so the fp32 values stay in ``[lo, hi]``)."""
    z = sample_noise(keys, (k,), seed=seed, epoch=epoch, stream=stream, dtype=torch.float64)
    if sampling == "uniform":
        u = 0.5 * torch.erfc(-z / 2 ** 0.5)
        sigma = lo + (hi - lo) * u
    elif sampling == "logit_normal":
        mean, std = logit_normal
        sigma = torch.sigmoid(mean + std * z)
    else:
        raise ValueError(f"train.timestep_sampling must be uniform or logit_normal here, got {sampling!r}")
    return sigma.clamp(lo, hi).to(torch.float32)


def draw_points(ctx, ro, *, choice: str | None = None) -> TrainPoints:
    """K training sigmas per sample and one fresh eps per (sample, timestep), drawn once per epoch (no host sync in
    the micro-steps), keyed by ``(seed, epoch, stream, key)`` so every world size and a resumed run draw the same.

    Which sigmas (``choice``; default the method's ``timestep_choice`` option, ``fraction`` for CRD):
    - ``fraction``: K distinct entries of the sampler's table among its ``int(N * train.timestep_fraction)``
      noisiest (the cleanest ``1 - fraction`` excluded; N = 10, fraction 0.99: the first 9);
    - ``official`` (NFT's default): what the official DiffusionNFT trainer does (NVlabs/DiffusionNFT
      ``scripts/train_nft_sd3.py``: every sample stores ALL N ``scheduler.timesteps``, line 662; one
      ``torch.randperm(N)`` per sample shuffles them, lines 810-816; the first
      ``num_train_timesteps = int(N * timestep_fraction)`` columns are trained, lines 569, 854-864): per sample
      independently, K distinct table entries (without replacement) from all N nonzero sigmas, the cleanest
      included (N = 10, fraction 0.99: 9 of the 10, one random step left out); its ``t = timesteps / 1000`` are
      the table's first N sigmas. (Its permutation comes from each rank's global RNG; ours is keyed per sample.)
    ``train.timestep_sharing`` says who shares a draw (:func:`timestep_keys`): ``sample`` (independent), ``group``
    (all members of a prompt group), ``micro_batch`` (every sample of one global micro-batch, all ranks).
    ``train.timestep_sampling``: ``discrete`` (table entries, as above) or continuous (:func:`continuous_sigmas`)
    over ``[sigma_min, sigma_max]`` = [the smallest eligible table sigma (at least 1e-3), the largest], so sigma
    is never 0: ``uniform`` or ``logit_normal`` ``sigmoid(N(mean, std))`` (``train.logit_normal``) clamped to that
    range (its mass below ``sigma_min`` lands ON ``sigma_min``); K independent values per key.
    The defaults (``fraction``, ``sample``, ``discrete``) are the original draw, bit for bit.
    """
    cfg, layout = ctx.cfg, ctx.layout
    tc = cfg.train
    table = ctx.sigmas()
    choice = choice or getattr(cfg.algo, "timestep_choice", "fraction")
    pool = eligible_pool(cfg.rollout.num_steps, tc.timestep_fraction, choice)
    keys, stream = timestep_keys(ro, layout, tc.timestep_sharing)
    if tc.timestep_sampling == "discrete":
        picks = sample_subsets(keys, pool, layout.timesteps, seed=cfg.seed, epoch=ro.epoch,
                               stream=stream).to(table.device)
        sigma = table[picks]
    else:
        ends = table[[0, pool - 1]].double().cpu().tolist()  # once per epoch
        lo, hi = max(min(ends), CONTINUOUS_SIGMA_MIN), max(ends)
        sigma = continuous_sigmas(keys, layout.timesteps, lo=lo, hi=hi, sampling=tc.timestep_sampling, seed=cfg.seed,
                                  epoch=ro.epoch, stream=stream,
                                  logit_normal=tuple(tc.logit_normal)).to(table.device)
    shape = tuple(ro.x0.shape[1:])
    eps = sample_noise(ro.global_idx, (layout.timesteps, *shape), seed=cfg.seed, epoch=ro.epoch,
                       stream=Stream.TRAIN_NOISE, device=ro.x0.device, dtype=ro.x0.dtype)
    return TrainPoints(sigma=sigma, eps=eps)


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


def forward_process_update(ctx, ro, adv: Advantages, *, anchor, loss, reference: str = "old") -> list[dict]:
    """The micro-step skeleton of the forward-process methods (CRD, NFT); per optimizer step its metrics.

    K stored timesteps per sample and their ``v_old`` once per epoch (the velocities of the ``reference`` adapter:
    ``old``, or ``pretrained`` for CRD's ``ratio_reference: pretrained``), then per optimizer step, per micro-batch
    (its K timesteps stacked into one pass, or one pass per timestep): the policy forward; ``anchor(mb, v_all)``
    under no_grad (a tuple of whole-micro-batch tensors); ``loss(t: TimestepInputs) -> (loss, {name: per-sample
    values})`` per timestep (the method's kernel and what it logs); ONE backward of the covered timesteps' summed
    losses through ``ctx.stepper``, each step's gradient the mean over its ``a * K`` micro-steps
    (``1 / layout.accumulation``).
    """
    layout = ctx.layout
    pts = draw_points(ctx, ro)
    with nvtx_range("train/old_forward"):
        v_old = snapshot_velocities(ctx, ro, pts, reference)
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
