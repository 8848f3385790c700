"""Building a run: a config -> the :class:`Context` the loop and the methods see.

:func:`build` does distributed init, the model (from the model-family registry, ``models.FAMILIES``) with the
method's adapters, the DeepSpeed engine and the stepper over it, snapshots, data, rewards, logger, checkpointer
and resume. The loop itself is ``engine/loop.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.checkpoint import Checkpointer
from engine.batch import BatchLayout, derive_batch, eligible_timesteps
from engine.config import Config, ConfigError, to_dict
from engine.methods import Method, get_method, section_name
from engine.rollout import EngineModel, compile_networks
from engine.runlog import RunLogger, Timer
from engine.snapshots import Snapshots
from engine.stepper import EngineStepper


@dataclass
class Context:
    """What methods see (see ``engine/methods/__init__.py``)."""

    cfg: Config
    method: Method
    dist: Any
    layout: BatchLayout
    model: EngineModel
    engine: Any                 # the DeepSpeed engine: the loop's checkpoints; methods train through ``stepper``
    stepper: EngineStepper
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
    reward_chunks: Any = None   # the rollout's chunk scorer while rewards overlap sampling (engine.rollout)
    _sigmas: torch.Tensor | None = None

    def sigmas(self) -> torch.Tensor:
        """The model's own rollout schedule (``rollout.num_steps`` + 1 values, 1 first), cached."""
        if self._sigmas is None:
            self._sigmas = self.model.sigmas(self.cfg.rollout.num_steps).to(self.dist.device, torch.float32)
        return self._sigmas


def build(cfg: Config) -> tuple[Context, int]:
    """Everything the loop needs, resumed when ``checkpoint.resume`` says so -> (context, first epoch to run)."""
    from engine import distributed
    from engine.data import GroupSampler, load_prompts

    method = get_method(cfg.method)(cfg)
    dist = distributed.init_distributed(cfg)
    ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), dist, keep=cfg.checkpoint.keep)
    resume = ckpt.resolve(cfg.checkpoint.resume)  # verified (a corrupt newest is skipped) before anything is built
    if resume:
        ckpt.check_config(resume, to_dict(cfg))  # another method/model/LoRA rank: one sentence, not a traceback
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
    if cfg.train.compile:
        compile_networks(flow)
    engine = _initialize(flow, cfg, layout)
    model = EngineModel(flow, engine)
    schedules = method.schedules()
    snapshots = Snapshots(flow.adapters, schedules) if schedules else None

    from engine.rewards import build_rewards
    rewards = build_rewards(cfg.rewards)
    run_dir = cfg.run_dir
    start_epoch, step = 0, 0
    if resume:
        state = ckpt.load(resume, engine, snapshots)
        sampler.check_state_dict(state["sampler"])
        method.load_state_dict(state.get("method", {}))
        method.load_rank_state(state["rank_state"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
    logger = RunLogger(run_dir, cfg, dist.is_main, cfg.train.epochs,
                       resumed_at=(step, start_epoch) if resume else None)
    if dist.is_main and not resume:
        import yaml
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump({**to_dict(cfg), section_name(cfg.method): to_dict(cfg.algo), "algo": None}, f,
                           sort_keys=False)
    ctx = Context(cfg=cfg, method=method, dist=dist, layout=layout, model=model, engine=engine,
                  stepper=EngineStepper(engine), snapshots=snapshots,
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


def build_model(cfg: Config, adapter_names) -> Any:
    """The FlowModel of ``cfg.model`` (its family from ``models.FAMILIES``) with the method's adapters attached
    (LoRA or full copies)."""
    from models import FAMILIES
    from models.lora import DEFAULT_TARGET_MODULES, LoraSettings

    mc = cfg.model
    dtype = torch.bfloat16 if mc.dtype == "bf16" else torch.float32
    family = FAMILIES.get(mc.family)
    if not callable(getattr(family, "load", None)):
        raise ConfigError(f"config key 'model.family': {mc.family!r} is {family!r}, not a FlowModel class "
                          "(models.base.FlowModel subclass with load/from_pretrained)")
    model = family.load(mc, dtype=dtype, seed=cfg.seed)
    model.latent_shape(mc.resolution, mc.resolution)  # resolution check: one clear error now
    lora = LoraSettings(rank=mc.lora_rank, alpha=mc.lora_alpha or None,
                        target_modules=tuple(mc.lora_targets) or DEFAULT_TARGET_MODULES)
    names = tuple(n for n in adapter_names if n != "pretrained")
    model.attach_adapters(names, mode=mc.finetune, lora=lora if mc.finetune == "lora" else None)
    return model
