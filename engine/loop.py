"""The training loop: one screen. Everything it calls is one module with one job (see architecture.md).

Per epoch: rollout -> decode -> reward -> advantages -> method update -> snapshots -> log / eval / checkpoint.
:func:`build` turns a config into a :class:`Context` (distributed init, model + adapters, DeepSpeed engine,
snapshots, data, rewards, logger, checkpointer, resume); :func:`train` runs the loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.checkpoint import Checkpointer
from engine.config import BatchLayout, Config, ConfigError, derive_batch, eligible_timesteps, to_dict
from engine.runlog import RunLogger, Timer, peak_memory
from engine.methods import Method, get_method
from engine.nvtx_ranges import nvtx_range
from engine.rollout import EngineModel, Rollout
from engine.snapshots import Snapshots


@dataclass
class Context:
    """What methods see (see ``engine/methods/__init__.py``)."""

    cfg: Config
    method: Method
    dist: Any
    layout: BatchLayout
    model: EngineModel
    engine: Any
    snapshots: Snapshots | None
    prompts: Any
    test_prompts: Any
    rewards: Any
    sampler: Any
    logger: RunLogger
    checkpointer: Checkpointer
    timer: Timer = field(default_factory=Timer)
    epoch: int = 0
    global_step: int = 0
    last_grad_norm: torch.Tensor | None = None
    _sigmas: torch.Tensor | None = None

    def sigmas(self) -> torch.Tensor:
        """The model's own rollout schedule (``rollout.num_steps`` + 1 values, 1 first), cached."""
        if self._sigmas is None:
            self._sigmas = self.model.sigmas(self.cfg.rollout.num_steps).to(self.dist.device, torch.float32)
        return self._sigmas


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
    with ctx.timer.phase("rollout", n), nvtx_range("rollout/sample"):
        ro = m.rollout(ctx, batch)
    adv, images = None, None
    if m.needs_rewards:
        with ctx.timer.phase("decode", n), nvtx_range("rollout/decode"):
            images = ctx.model.decode(ro.x0)
        with ctx.timer.phase("reward", n), nvtx_range("reward/score"):
            scores = ctx.rewards.score(images, ro.prompts, ro.metadata)
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


# -------------------------------------------------------------------------------------------------- building
def build(cfg: Config) -> tuple[Context, int]:
    """Everything the loop needs, resumed when ``checkpoint.resume`` says so -> (context, first epoch to run)."""
    from engine import distributed
    from engine.data import GroupSampler, load_prompts

    method = get_method(cfg.method)(cfg)
    dist = distributed.init_distributed(cfg)
    timesteps = cfg.train.num_timesteps or eligible_timesteps(cfg.rollout.num_steps, cfg.train.timestep_fraction)
    if timesteps > eligible_timesteps(cfg.rollout.num_steps, cfg.train.timestep_fraction):
        raise ConfigError(f"config key 'train.num_timesteps' = {timesteps} exceeds the "
                          f"{eligible_timesteps(cfg.rollout.num_steps, cfg.train.timestep_fraction)} eligible sigmas "
                          f"(int(rollout.num_steps * train.timestep_fraction))")
    layout = derive_batch(dist.world_size, cfg.data.prompts_per_epoch, cfg.data.group_size,
                          cfg.train.micro_batch_size, cfg.train.gradient_steps_per_epoch, timesteps,
                          exact_groups=method.exact_groups)
    prompts = _load(load_prompts, cfg.data.train_prompts, "data.train_prompts", cfg.data.kind)
    test_prompts = (_load(load_prompts, cfg.data.test_prompts, "data.test_prompts", cfg.data.kind)
                    if cfg.data.test_prompts and cfg.eval.num_prompts else None)
    if cfg.data.prompts_per_epoch > len(prompts):
        raise ConfigError(f"config key 'data.prompts_per_epoch' = {cfg.data.prompts_per_epoch} exceeds the "
                          f"{len(prompts)} prompts of {cfg.data.train_prompts!r}")
    try:
        strata = prompts.tag_ids() if cfg.data.balance_tags else None
    except ValueError as e:
        raise ConfigError(f"config key 'data.balance_tags' is true but {e}") from None
    sampler = GroupSampler(len(prompts), cfg.data.prompts_per_epoch, cfg.data.group_size, 1, 0, cfg.seed,
                           strata=strata)

    torch.manual_seed(cfg.seed)  # identical initial weights (LoRA init) on every rank
    flow = build_model(cfg, method.adapters).to(dist.device)
    with torch.no_grad():
        flow.null_cond(1)  # cache the empty prompt now: under ZeRO-3 the anchor's forward must not run the encoder
    engine = _initialize(flow, cfg, layout)
    model = EngineModel(flow, engine)
    schedules = method.schedules()
    snapshots = Snapshots(flow.adapters, schedules) if schedules else None

    from engine.rewards import build_rewards
    rewards = build_rewards([{**to_dict(r), "key": r.key or None} for r in cfg.rewards])
    run_dir = cfg.run_dir
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), dist, keep=cfg.checkpoint.keep)
    start_epoch, step = 0, 0
    resume = ckpt.resolve(cfg.checkpoint.resume)
    if resume:
        state = ckpt.load(resume, engine, snapshots)
        sampler.check_state_dict(state["sampler"])
        method.load_state_dict(state.get("method", {}))
        method.load_rank_state(state["rank_state"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
    logger = RunLogger(run_dir, cfg, dist.is_main, cfg.train.epochs)
    if dist.is_main and not resume:
        import yaml
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump({**to_dict(cfg), cfg.method: to_dict(cfg.algo), "algo": None}, f, sort_keys=False)
    ctx = Context(cfg=cfg, method=method, dist=dist, layout=layout, model=model, engine=engine, snapshots=snapshots,
                  prompts=prompts, test_prompts=test_prompts, rewards=rewards, sampler=sampler, logger=logger,
                  checkpointer=ckpt, epoch=start_epoch, global_step=step)
    return ctx, start_epoch


def _initialize(flow, cfg, layout):
    from engine import distributed
    return distributed.initialize(flow, cfg, layout)


def _load(load_prompts, path: str, key: str, kind: str):
    if not os.path.isfile(path):
        raise ConfigError(f"config key {key!r}: prompt file {path!r} does not exist")
    return load_prompts(path, kind=kind or None)


#: model family -> (module, FlowModel class with ``from_pretrained(path, dtype=...)``)
FAMILIES = {"sd3": ("models.sd3", "SD3Model"), "flux": ("models.flux", "FluxModel"),
            "onestep": ("models.onestep", "UNetOneStep")}


def build_model(cfg: Config, adapter_names) -> Any:
    """The FlowModel of ``cfg.model`` with the method's adapters attached (LoRA or full copies)."""
    from models.lora import DEFAULT_TARGET_MODULES, LoraSettings

    mc = cfg.model
    dtype = torch.bfloat16 if mc.dtype == "bf16" else torch.float32
    if mc.family == "testbed":
        from models.testbed import TestbedConfig, TestbedModel
        if mc.random_init:
            from engine.testbed.world import vocabulary_words
            model = TestbedModel.from_config(TestbedConfig.from_dict(dict(mc.size)), vocabulary_words(), seed=cfg.seed)
        else:
            if not os.path.isdir(mc.path):
                raise ConfigError(f"config key 'model.path': model directory {mc.path!r} does not exist "
                                  "(train the testbed base model first, or set model.random_init=true)")
            model = TestbedModel.from_pretrained(mc.path, dtype=dtype)
    else:
        import importlib
        module_name, cls_name = FAMILIES[mc.family]
        cls = getattr(importlib.import_module(module_name), cls_name)
        if not os.path.isdir(mc.path):
            raise ConfigError(f"config key 'model.path': model directory {mc.path!r} does not exist")
        # the resolution sets Flux-dev's schedule shift and SDXL's micro-conditioning
        model = cls.from_pretrained(mc.path, dtype=dtype, resolution=mc.resolution)
    model.latent_shape(mc.resolution, mc.resolution)  # resolution check: one clear error now
    lora = LoraSettings(rank=mc.lora_rank, alpha=mc.lora_alpha or None,
                        target_modules=tuple(mc.lora_targets) or DEFAULT_TARGET_MODULES)
    names = tuple(n for n in adapter_names if n != "pretrained")
    model.attach_adapters(names, mode=mc.finetune, lora=lora if mc.finetune == "lora" else None)
    return model


# ------------------------------------------------------------------------------------------ eval / checkpoint
@torch.no_grad()
def evaluate(ctx: Context) -> dict:
    """Mean held-out reward of ``eval.adapter`` (one sample per prompt by ``method.eval_sample``, fixed noise),
    all ranks together."""
    from engine.rollout import STREAM_INIT_NOISE, sample_noise

    cfg, dist = ctx.cfg, ctx.dist
    if ctx.test_prompts is None:
        return {}
    n = min(cfg.eval.num_prompts, len(ctx.test_prompts))
    per_rank = -(-n // dist.world_size)  # equal forward counts on every rank (ZeRO-3 collectives)
    idx = torch.arange(dist.rank * per_rank, (dist.rank + 1) * per_rank) % n
    prompts, meta = ctx.test_prompts.select(idx.tolist())
    cond = ctx.model.encode(prompts).to(dist.device)
    shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
    noise = sample_noise(idx, shape, seed=cfg.seed, epoch=-1 & 0xFFFF, stream=STREAM_INIT_NOISE, device=dist.device)
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
