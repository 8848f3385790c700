"""FDFO: Finite Difference Flow Optimization (spec/methods.md section 4).

The whole sampling run is one action. Per prompt, one pair of trajectories (rows ``2p``, ``2p + 1``):

1. rollout: the churned-Euler pair sampler (``models.samplers.sample_fdfo_pairs``: shared initial noise, fresh churn
   per branch) with the current policy, storing per branch the states where v was evaluated, the velocities used
   (``v_ref``) and x_T, in ``fdfo.storage_dtype``; CFG optional (training then uses the same CFG);
2. rewards on both branches, raw units (no group normalisation);
3. ``kernels.fdfo_pairs(x_T, R) -> (dR, dxh)``, one row per branch;
4. items (branch, step) of ALL ranks are shuffled with a permutation seeded by (seed, epoch) and split into
   ``gradient_steps_per_epoch`` optimizer steps; each rank trains on the items of its own branches;
5. ``kernels.fdfo_loss(v_theta, v_ref, dxh, dR, item_index=...)`` (SPO surrogate; ``dxh``/``dR`` stay one row per
   branch and items index into them: no per-step copy) plus the optional KL ``lam * mean_pix (v_theta - v_pre)^2``;
   AdamW (lr 3e-5, wd 1e-4, clip 1.0 in the recipes), no EMA: the rollout uses the policy itself, so the ratio is
   exactly 1 on the first micro-step of every epoch (logged as ``ratio_first_dev``).

W-process == 1-process: every optimizer step's loss is ``(1/M) sum`` over the step's M global items. A rank
back-propagates ``(W/M) sum`` over the items it owns, so the ranks' mean gradient (what DeepSpeed all-reduces) is the
1-process gradient. Ranks own different numbers of a step's items; they pad to the same number of micro-batches
(known on every rank from the shared permutation, no communication) with zero-weight items, so collective-bearing
forwards (ZeRO-3) stay in lockstep. Initial and churn noise are drawn per GLOBAL sample (``engine.rollout``), so the
rollouts do not depend on the world size either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import kernels
from engine.errors import ConfigError
from engine.runlog import StepStats
from engine.methods import Method, register
from engine.methods.common import check_bad_rewards
from engine.nvtx_ranges import nvtx_range
from engine.options import opt
from engine.streams import Stream
from models.base import Cond
from models.samplers import sample_fdfo_pairs

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class FDFOConfig:
    """FDFO options (YAML section ``fdfo``); every option has a working default (the paper's 40-step recipe).

    Optimizer settings are the engine's ``train.*`` keys (FDFO recipes: lr 3e-5, wd 1e-4, clip 1.0,
    gradient_steps_per_epoch 4); ``data.group_size`` must be 2 (one pair per prompt).
    """

    num_steps: int = opt(40, "N: churned-Euler pair-sampler steps (10 = fast preset)")
    gamma: float = opt(0.0025, "churn g at every level (0 on the last step)")
    gamma_schedule: list = opt([], "per-step churn table (num_steps values) overriding gamma; [] = constant gamma")
    prior_gamma: float = opt(-1.0, "prior churn g0 on the shared initial noise; < 0 = the first step's churn")
    cfg_scale: float = opt(1.0, "CFG scale of sampling AND training (1 = no CFG)")
    storage_dtype: str = opt("fp32", "stored states/velocities: fp32 | bf16 (ratio exactly 1 needs the model's own "
                                     "dtype)")
    clip: float = opt(0.03, "eps_clip of the SPO surrogate")
    kl_lambda: float = opt(0.0, "lam of lam * mean_pix (v - v_pre)^2 (0 = off)")
    micro_batch_items: int = opt(16, "items (branch, step) per rank per micro-step")

    def validate(self, run_config: Any = None) -> None:
        """Value checks (ConfigError naming the key); with the run config, the batch layout FDFO needs."""
        def need(ok: bool, key: str, what: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {what}, got {got!r}")

        need(self.num_steps >= 1, "fdfo.num_steps", ">= 1", self.num_steps)
        need(self.gamma >= 0, "fdfo.gamma", ">= 0", self.gamma)
        need(not self.gamma_schedule or len(self.gamma_schedule) == self.num_steps, "fdfo.gamma_schedule",
             f"empty or a list of num_steps = {self.num_steps} values", self.gamma_schedule)
        need(all(isinstance(g, (int, float)) and g >= 0 for g in self.gamma_schedule), "fdfo.gamma_schedule",
             "a list of numbers >= 0", self.gamma_schedule)
        need(self.storage_dtype in STORAGE_DTYPES, "fdfo.storage_dtype", "fp32 or bf16", self.storage_dtype)
        need(self.clip > 0, "fdfo.clip", "> 0", self.clip)
        need(self.kl_lambda >= 0, "fdfo.kl_lambda", ">= 0", self.kl_lambda)
        need(self.cfg_scale > 0, "fdfo.cfg_scale", "> 0", self.cfg_scale)
        need(self.micro_batch_items >= 1, "fdfo.micro_batch_items", ">= 1", self.micro_batch_items)
        if run_config is not None:
            need(run_config.data.group_size == 2, "data.group_size", "2 for FDFO (one pair of trajectories per "
                 "prompt)", run_config.data.group_size)
            need(run_config.train.micro_batch_size % 2 == 0, "train.micro_batch_size",
                 "even for FDFO (both branches of a pair on one rank)", run_config.train.micro_batch_size)

    def gammas(self) -> float | torch.Tensor:
        """The churn handed to the sampler: a float or a per-step table."""
        if self.gamma_schedule:
            return torch.tensor([float(g) for g in self.gamma_schedule], dtype=torch.float64)
        return float(self.gamma)


# ---------------------------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# The global item schedule
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ItemSchedule:
    """One rank's items for one epoch. ``micro[s]`` is a [n_micro_s, m] LongTensor of LOCAL item ids
    (``local_row * N + step``), ``-1`` = padding; ``step_items[s]`` is M_s, the global item count of optimizer step s.
    """

    micro: list[torch.Tensor]
    step_items: list[int]


def item_schedule(*, rank_rows: Sequence[torch.Tensor], rank: int, num_steps: int, gradient_steps: int,
                  micro_batch_size: int, seed: int, epoch: int) -> ItemSchedule:
    """Shuffle all global items (global row, step) with a permutation seeded by (seed, epoch), split them into
    ``gradient_steps`` near-equal optimizer steps and keep this rank's (``rank_rows[r]``: the global rows rank r
    holds, in its local order), padded to the same micro-batch count on every rank. Identical on every rank, no
    communication, on the CPU."""
    world = len(rank_rows)
    n_rows = sum(int(r.numel()) for r in rank_rows)
    owner = torch.empty(n_rows, dtype=torch.long)
    local = torch.empty(n_rows, dtype=torch.long)
    for r, rows in enumerate(rank_rows):
        owner[rows.cpu()] = r
        local[rows.cpu()] = torch.arange(rows.numel())
    total = n_rows * num_steps
    if gradient_steps > total:
        raise ConfigError(f"train.gradient_steps_per_epoch ({gradient_steps}) exceeds the epoch's {total} FDFO "
                          f"items (rows {n_rows} x steps {num_steps})")
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2 ** 63))
    perm = torch.randperm(total, generator=g)
    micro, sizes = [], []
    for chunk in torch.tensor_split(perm, gradient_steps):
        row, step = chunk // num_steps, chunk % num_steps
        who = owner[row]
        n_micro = max(1, math.ceil(int(torch.bincount(who, minlength=world).max()) / micro_batch_size))
        mine = who == rank
        ids = local[row[mine]] * num_steps + step[mine]
        padded = torch.full((n_micro * micro_batch_size,), -1, dtype=torch.long)
        padded[: ids.numel()] = ids
        micro.append(padded.view(n_micro, micro_batch_size))
        sizes.append(int(chunk.numel()))
    return ItemSchedule(micro, sizes)


def contiguous_rank_rows(rows_per_rank: int, world_size: int) -> list[torch.Tensor]:
    """Rank r holds global rows ``r * rows_per_rank ...`` (the plain split)."""
    return [torch.arange(r * rows_per_rank, (r + 1) * rows_per_rank) for r in range(world_size)]


# ---------------------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------------------

def spo_per_item(ratio: torch.Tensor, dR: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-item SPO loss ``-dR rho + |dR| / (2 clip) (rho - 1)^2`` from the kernel's ratios (for logging)."""
    return -dR * ratio + dR.abs() / (2 * clip) * (ratio - 1).square()


def fdfo_update(model: Any, data: PairData, dR: torch.Tensor, dxh: torch.Tensor, stepper: Any, cfg: FDFOConfig, *,
                rank_rows: Sequence[torch.Tensor], rank: int, gradient_steps: int, seed: int, epoch: int,
                kernel_backend: str = "auto") -> list[tuple[StepStats, Any]]:
    """``gradient_steps`` optimizer steps over the epoch's shuffled items through ``stepper``
    (:mod:`engine.stepper`); per step (stats, ``stepper.metrics()``: grad norm and LR).

    ``dR`` [2P], ``dxh`` [2P, ...] from ``kernels.fdfo_pairs`` (this rank's rows). Stats per valid item: ``loss``
    (SPO), ``ratio``, ``log_ratio``, ``kl`` (when on); ``ratio_first_dev`` = |ratio - 1| on the epoch's first
    micro-step (exactly 0 on-policy). No host sync inside micro-steps: the schedule is built on the CPU and its
    indices reach the device in one transfer per epoch.
    """
    rows, n = data.num_rows, data.num_steps
    world = len(rank_rows)
    dev = data.x_final.device
    # one zero branch row at the end: padding items index it and contribute exactly 0 loss and 0 gradient
    dR_ext = torch.cat([dR, dR.new_zeros(1)])
    dxh_ext = torch.cat([dxh, dxh.new_zeros((1,) + dxh.shape[1:])])
    sched = item_schedule(rank_rows=rank_rows, rank=rank, num_steps=n, gradient_steps=gradient_steps,
                          micro_batch_size=cfg.micro_batch_items, seed=seed, epoch=epoch)
    sigmas = data.sigmas.to(dev)
    # every index the epoch needs, built on the CPU and moved to the device in ONE transfer (no per-micro-step
    # host<->device traffic): per micro-step [row, step, branch] for all m slots and the positions of real items
    micro_all = torch.cat(sched.micro)                              # [n_micro_total, m], -1 = padding
    safe = micro_all.clamp_min(0)
    real = micro_all >= 0
    table = torch.stack([safe // n, safe % n, torch.where(real, safe // n, torch.full_like(safe, rows))], 1)
    keep_lists = [torch.nonzero(r).squeeze(1) for r in real]
    keep_off = [0]
    for k in keep_lists:
        keep_off.append(keep_off[-1] + k.numel())
    table, keep_flat = table.to(dev), torch.cat(keep_lists).to(dev)
    out, first, g = [], True, 0
    for micro, m_items in zip(sched.micro, sched.step_items):
        stats = StepStats()
        scale = world / m_items  # this rank's share of the step's global mean
        for j in range(micro.shape[0]):
            row, step, branch = table[g]                             # padding items -> the zero branch row
            keep = keep_flat[keep_off[g]: keep_off[g + 1]]
            g += 1
            x, v_ref, sig, c = data.states[step, row], data.velocities[step, row], sigmas[step], data.cond.index(row)
            with nvtx_range("train/policy_forward"):
                v = velocity_for(model, x, sig, c, cfg.cfg_scale, "policy")
            with nvtx_range("train/loss"):
                loss_mean, st = kernels.fdfo_loss(v, v_ref, dxh_ext, dR_ext, clip=cfg.clip, item_index=branch,
                                                  backend=kernel_backend)
                loss = loss_mean * (micro.shape[1] * scale)
            if cfg.kl_lambda > 0:
                with nvtx_range("train/anchor_forward"), torch.no_grad():
                    v_pre = velocity_for(model, x, sig, c, cfg.cfg_scale, "pretrained")
                kl = (v.float() - v_pre.float()).square().flatten(1).mean(1)
                loss = loss + (cfg.kl_lambda * scale) * kl[keep].sum()
                stats.add("kl", kl.detach()[keep])
            stepper.backward(loss, last=j == micro.shape[0] - 1)
            ratio = st["ratio"].detach()[keep]
            stats.add("ratio", ratio)
            stats.add("log_ratio", st["log_ratio"].detach()[keep])
            stats.add("loss", spo_per_item(ratio.float(), dR_ext[branch[keep]].float(), cfg.clip))
            if first:
                stats.add("ratio_first_dev", (ratio.double() - 1).abs())
                first = False
        out.append((stats, stepper.metrics()))
    return out


class FDFO:
    """FDFO without the engine: a model, a stepper, tensors (used by tests and by :class:`FDFOMethod`)."""

    def __init__(self, cfg: FDFOConfig, *, gradient_steps_per_epoch: int = 4, seed: int = 0,
                 rank: int = 0, rank_rows: Sequence[torch.Tensor] | None = None, kernel_backend: str = "auto"):
        cfg.validate()
        self.cfg, self.gradient_steps, self.seed, self.rank = cfg, gradient_steps_per_epoch, seed, rank
        self.rank_rows, self.kernel_backend = rank_rows, kernel_backend

    def rollout(self, model: Any, cond: Cond, x_init_shared: torch.Tensor, generator: torch.Generator | None,
                **kw) -> PairData:
        return paired_rollout(model, cond, x_init_shared, self.cfg, generator, **kw)

    def update(self, model: Any, data: PairData, rewards: torch.Tensor, stepper: Any, *, epoch: int
               ) -> list[tuple[StepStats, Any]]:
        """``rewards`` [2P] raw, one per branch -> per optimizer step (stats, grad_norm)."""
        if rewards.shape != (data.num_rows,):
            raise ValueError(f"FDFO: rewards must have shape ({data.num_rows},) (one per branch), got "
                             f"{tuple(rewards.shape)}")
        dR, dxh = kernels.fdfo_pairs(data.x_final, rewards, backend=self.kernel_backend)
        rank_rows = self.rank_rows or contiguous_rank_rows(data.num_rows, 1)
        return fdfo_update(model, data, dR, dxh, stepper, self.cfg, rank_rows=rank_rows, rank=self.rank,
                           gradient_steps=self.gradient_steps, seed=self.seed, epoch=epoch,
                           kernel_backend=self.kernel_backend)


# ---------------------------------------------------------------------------------------------------------------
# The engine method
# ---------------------------------------------------------------------------------------------------------------

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
