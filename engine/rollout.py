"""Rollouts: P prompts x G samples, group-contiguous across ranks, sampled with a snapshot; plus the deterministic
per-sample random draws every method shares.

Randomness is keyed by the GLOBAL sample index (``seed``, ``epoch``, stream, index): sample 17's initial noise is the
same whether it is sampled by rank 0 of one process or by rank 1 of two, which is what makes a multi-process run
equal a single-process run with the same global batch, and a resumed run equal an uninterrupted one.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from engine.streams import Stream
from models.base import Cond, FlowModel



def _seed(seed: int, epoch: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, int(stream), index]).generate_state(1, np.uint64)[0] >> 1)


def sample_noise(global_idx: torch.Tensor, shape: Sequence[int], *, seed: int, epoch: int, stream: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n, *shape]`` standard normal noise, row i drawn from the seed of global sample ``global_idx[i]``."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    rows = []
    for i in global_idx.tolist():
        gen.manual_seed(_seed(seed, epoch, stream, i))
        rows.append(torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32))
    return torch.stack(rows).to(dtype) if rows else torch.empty((0, *shape), device=device, dtype=dtype)


def sample_subsets(global_idx: torch.Tensor, pool: int, k: int, *, seed: int, epoch: int, stream: int
                   ) -> torch.Tensor:
    """``[n, k]`` LongTensor: per sample, ``k`` distinct indices of ``range(pool)`` in random order."""
    gen = torch.Generator()
    rows = []
    for i in global_idx.tolist():
        gen.manual_seed(_seed(seed, epoch, stream, i))
        rows.append(torch.randperm(pool, generator=gen)[:k])
    return torch.stack(rows) if rows else torch.empty((0, k), dtype=torch.long)


def compile_networks(model: FlowModel) -> list:
    """``train.compile``: ``torch.compile`` every network an adapter of ``model`` runs, in place
    (``nn.Module.compile``), so parameter names, checkpoints, LoRA export and the DeepSpeed engine that wraps the
    model see the same modules. Dynamo guards on each LoRA layer's active adapter and on the grad mode, so every
    (adapter, grad mode) pair a method uses is one graph, plus one when a second batch size makes the batch dimension
    dynamic: all compiled in the first epoch and reused after (``tests/test_train_compile.py`` counts them). Returns
    the compiled networks."""
    import torch._dynamo

    from engine.errors import ConfigError
    if getattr(model, "adapted_attr", "") == "unet":
        raise ConfigError("config key 'train.compile' must be false for a UNet family (onestep): torch's inductor "
                          "gives wrong LoRA gradients on the diffusers UNet (zero in the mid block; measured with "
                          "torch 2.13, tests/test_train_compile.py)")
    nets = list({id(m): m for m in (model.adapters.module(n) for n in model.adapters.names)}.values())
    # every compiled network shares nn.Module's call code, whose cache holds one entry per graph of all of them
    need = 2 * (len(model.adapters.names) + 1) * len(nets)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, need)
    for net in nets:
        net.compile()
    return nets


class EngineModel:
    """The FlowModel as methods see it: ``velocity`` / ``velocity_cfg_pair`` / ``guided_velocity`` run through the
    DeepSpeed engine's forward (ZeRO-3 gathers, hooks); everything else (``encode``, ``sigmas``, ``decode``,
    ``adapters``, ...) is the FlowModel's own."""

    def __init__(self, model: FlowModel, engine) -> None:
        self._model, self._engine = model, engine
        # ZeRO-3 partitions the frozen text encoders too; they run outside the engine's forward (prompt encoding,
        # cached), so their parameters are gathered for the duration of an encode call
        self._encoder_params = []
        if engine is not None and engine.zero_optimization_stage() == 3:
            net = getattr(model, "adapted_attr", "transformer")
            self._encoder_params = [p for n, p in model.named_parameters()
                                    if not (n.startswith(net + ".") or n.startswith("adapters."))]

    @property
    def flow(self) -> FlowModel:
        """The FlowModel itself, outside the DeepSpeed engine: for a method that trains with optimizers of its own
        (DIDR), since the engine's hooks would route its backwards into the engine's single optimizer."""
        return self._model

    def encode(self, prompts, **kwargs):
        if not self._encoder_params:
            return self._model.encode(prompts, **kwargs)
        import deepspeed
        with deepspeed.zero.GatheredParameters(self._encoder_params, modifier_rank=None):
            return self._model.encode(prompts, **kwargs)

    def velocity(self, x, sigma, cond, *, adapter: str = "policy"):
        return self._engine(x, sigma, cond, adapter=adapter)

    def velocity_cfg_pair(self, x, sigma, cond, *, adapter: str = "pretrained"):
        return self._engine(x, sigma, cond, adapter=adapter, pair=True)

    def guided_velocity(self, x, sigma, cond, scale: float, *, adapter: str = "pretrained"):
        if scale == 1.0:
            return self.velocity(x, sigma, cond, adapter=adapter)
        v_c, v_u = self.velocity_cfg_pair(x, sigma, cond, adapter=adapter)
        return v_u + scale * (v_c - v_u)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


@dataclass
class Rollout:
    """One rank's samples of an epoch, in its processing order (see ``BatchLayout``).

    ``global_idx`` global sample numbers; ``prompt_idx`` indices into the prompt set; ``group_ids`` global group
    ids; ``cond`` text conditions (one row per sample); ``x0`` final latents (None for methods without a stored
    rollout); ``extras`` whatever else a method stores (FDFO: states, velocities).
    """

    epoch: int
    global_idx: torch.Tensor
    prompt_idx: torch.Tensor
    group_ids: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    cond: Cond
    x0: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.global_idx.numel())


def encode(model, prompts: list[str], ids: list[int]) -> Cond:
    """``model.encode`` with prompt ids as cache keys when the family supports them."""
    import inspect
    fn = model._model.encode if isinstance(model, EngineModel) else model.encode
    if "ids" in inspect.signature(fn).parameters:
        return model.encode(prompts, ids=ids)
    return model.encode(prompts)


def rank_samples(ctx, batch) -> Rollout:
    """This rank's samples of ``batch`` (an ``engine.data.EpochBatch``) laid out per ``ctx.layout``, encoded."""
    idx = ctx.layout.rank_indices(ctx.dist.rank)
    prompt_idx = batch.all_prompt_idx[idx]
    group_ids = batch.all_group_ids[idx]
    prompts, metadata = ctx.prompts.select(prompt_idx.tolist())
    with torch.no_grad():
        cond = encode(ctx.model, prompts, prompt_idx.tolist()).to(ctx.dist.device)
    return Rollout(epoch=batch.epoch, global_idx=idx, prompt_idx=prompt_idx, group_ids=group_ids.to(ctx.dist.device),
                   prompts=prompts, metadata=metadata, cond=cond)


@torch.no_grad()
def ode_rollout(ctx, batch, adapter: str) -> Rollout:
    """Deterministic Euler ODE rollouts (``rollout.num_steps``, no CFG) with ``adapter``; keeps ``x0`` only."""
    from models.samplers import sample_ode

    ro = rank_samples(ctx, batch)
    cfg = ctx.cfg
    shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
    noise = sample_noise(ro.global_idx, shape, seed=cfg.seed, epoch=ro.epoch, stream=Stream.INIT_NOISE,
                         device=ctx.dist.device)
    sigmas = ctx.sigmas()
    bs = cfg.rollout.batch_size
    outs = []
    for start in range(0, len(ro), bs):
        sl = slice(start, start + bs)
        outs.append(sample_ode(ctx.model, noise[sl], ro.cond.index(sl), sigmas, adapter=adapter))
        if getattr(ctx, "reward_chunks", None) is not None:  # train.overlap_rewards: scored while the next samples
            ctx.reward_chunks.add(sl.start, sl.start + len(outs[-1]), outs[-1], ro.prompts[sl], ro.metadata[sl])
    ro.x0 = torch.cat(outs)
    return ro


@contextmanager
def overlapped_scoring(ctx, on: bool):
    """Inside the block ``ode_rollout`` hands every finished chunk to a :class:`~engine.rewards.ChunkScoring`
    (yielded; None when ``on`` is false), which decodes it and scores it in a worker thread while the next chunk is
    sampled."""
    if not on:
        yield None
        return
    from engine.rewards.async_backend import ChunkScoring
    ctx.reward_chunks = scoring = ChunkScoring(ctx.rewards, ctx.model.decode)
    try:
        yield scoring
    finally:
        ctx.reward_chunks = None
        scoring.close()
