"""FDFO's update: the global item schedule (shuffled over all ranks) and the SPO optimizer steps over it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import kernels
from engine.errors import ConfigError
from engine.methods.fdfo.config import FDFOConfig
from engine.methods.fdfo.rollout import PairData, velocity_for
from engine.nvtx_ranges import nvtx_range
from engine.runlog import StepStats


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

