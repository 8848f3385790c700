"""The training loop: one screen. Everything it calls is one module with one job (see architecture.md).

Per epoch: rollout -> decode -> reward -> advantages -> method update -> snapshots -> log / eval / checkpoint.
:func:`engine.context.build` turns a config into a :class:`~engine.context.Context`; :func:`train` runs the loop.
"""
from __future__ import annotations

import torch

from engine.config import Config, to_dict
from engine.context import Context, build
from engine.nvtx_ranges import nvtx_range
from engine.rollout import overlapped_scoring
from engine.runlog import peak_memory
from engine.streams import LOOP_EVAL_EPOCH, Stream


def train(cfg: Config) -> dict:
    """Run ``cfg`` to the end; returns the last epoch's metrics."""
    ctx, start_epoch = build(cfg)
    last = {}
    try:
        if start_epoch == 0 and ctx.test_prompts is not None:
            ctx.logger.log(0, evaluate(ctx), kind="eval")  # the "before" of the before/after comparison
        for epoch in range(start_epoch, cfg.train.epochs):
            last, images, _ = run_epoch(ctx, epoch)
            ctx.logger.log(ctx.global_step, last, kind="epoch")
            ctx.logger.progress_line(epoch, last)
            if images is not None and cfg.log.grid_every and (epoch + 1) % cfg.log.grid_every == 0:
                ctx.logger.save_grid(images[:64], f"epoch{epoch + 1:05d}")
            final = epoch + 1 == cfg.train.epochs
            if ctx.test_prompts is not None and (final or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0)):
                last.update(evaluate(ctx))
                ctx.logger.log(ctx.global_step, last, kind="eval")
            if (cfg.checkpoint.every and (epoch + 1) % cfg.checkpoint.every == 0) or (final and cfg.checkpoint.at_end):
                with nvtx_range("checkpoint/save"):
                    save_checkpoint(ctx, epoch + 1)
    finally:
        ctx.logger.close()
        if hasattr(ctx.rewards, "close"):
            ctx.rewards.close()
    return last


def run_epoch(ctx: Context, epoch: int) -> tuple[dict, torch.Tensor | None, list[dict]]:
    """One epoch: rollout -> decode -> reward -> advantages -> method update -> snapshots; every optimizer step's
    metrics are logged. Returns (the epoch record, the decoded rollout images or None, the per-step metrics); the
    benchmarks time exactly this."""
    m, n = ctx.method, ctx.layout.samples_per_rank
    ctx.epoch = epoch
    batch = ctx.sampler.epoch(epoch)
    with ctx.timer.phase("rollout", n), nvtx_range("rollout/sample"), \
            overlapped_scoring(ctx, m.needs_rewards and ctx.cfg.train.overlap_rewards) as chunks:
        ro = m.rollout(ctx, batch)  # with overlap: each chunk is decoded and handed to the scoring thread
    adv, images = None, None
    if m.needs_rewards:
        overlapped = chunks is not None and chunks.covers(len(ro))  # else (a rollout without chunks): score after
        if not overlapped:
            with ctx.timer.phase("decode", n), nvtx_range("rollout/decode"):
                images = ctx.model.decode(ro.x0)
        with ctx.timer.phase("reward", n), nvtx_range("reward/score"):
            images, scores = chunks.result() if overlapped else (images, ctx.rewards.score(images, ro.prompts,
                                                                                           ro.metadata))
        with ctx.timer.phase("advantages", n), nvtx_range("advantages/compute"):
            adv = m.advantages(ctx, ro, scores)
    with ctx.timer.phase("train", n), nvtx_range("train/update"):
        steps = m.update(ctx, ro, adv)
    for metrics in steps:
        ctx.global_step += 1
        ctx.logger.log(ctx.global_step, metrics)
    with ctx.timer.phase("snapshot", 0), nvtx_range("snapshot/update"):
        snap = m.snapshot_update(ctx)
    last = {**snap, **(adv.metrics if hasattr(adv, "metrics") else {}), **(steps[-1] if steps else {}),
            **ctx.timer.pop(), **peak_memory(), "epoch": epoch}
    return last, images, steps


# ------------------------------------------------------------------------------------------ eval / checkpoint
@torch.no_grad()
def evaluate(ctx: Context) -> dict:
    """Mean held-out reward of ``eval.adapter`` (one sample per prompt by ``method.eval_sample``, fixed noise),
    all ranks together."""
    from engine.rollout import sample_noise

    cfg, dist = ctx.cfg, ctx.dist
    if ctx.test_prompts is None:
        return {}
    n = min(cfg.eval.num_prompts, len(ctx.test_prompts))
    per_rank = -(-n // dist.world_size)  # equal forward counts on every rank (ZeRO-3 collectives)
    idx = torch.arange(dist.rank * per_rank, (dist.rank + 1) * per_rank) % n
    prompts, meta = ctx.test_prompts.select(idx.tolist())
    cond = ctx.model.encode(prompts).to(dist.device)
    shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
    noise = sample_noise(idx, shape, seed=cfg.seed, epoch=LOOP_EVAL_EPOCH, stream=Stream.INIT_NOISE,
                         device=dist.device)
    x0 = ctx.method.eval_sample(ctx, noise, cond, cfg.eval.adapter)
    scores = ctx.rewards.score(ctx.model.decode(x0), prompts, meta)
    real = (torch.arange(dist.rank * per_rank, (dist.rank + 1) * per_rank) < n).to(dist.device)
    r = torch.nan_to_num(scores["reward"].to(dist.device)) * real
    tot = dist.all_reduce_sum(torch.stack([r.sum(), real.sum().float()]))
    return {"eval/reward": float(tot[0] / tot[1])}


def save_checkpoint(ctx: Context, next_epoch: int) -> str:
    state = {"epoch": next_epoch, "method": ctx.method.state_dict(), "sampler": ctx.sampler.state_dict(),
             "config": to_dict(ctx.cfg), "algo": to_dict(ctx.cfg.algo)}
    return ctx.checkpointer.save(ctx.global_step, ctx.engine, ctx.snapshots, state, ctx.method.rank_state())
