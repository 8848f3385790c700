"""The batch arithmetic: the ONE place where per-rank batch sizes, gradient accumulation and the micro-batch layout
come from (world size, prompts per epoch, group size, micro-batch size, optimizer steps per epoch, timesteps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """Who processes which sample, when. Global samples are numbered ``0 .. N-1`` group after group
    (group ``g`` = samples ``g*G .. g*G+G-1``). A *global micro-batch* is ``world_size * micro_batch_size``
    consecutive samples; rank ``r`` holds its ``r``-th chunk of ``micro_batch_size``. Optimizer step ``s`` of an
    epoch covers global micro-batches ``s*a .. s*a+a-1``, each at ``timesteps`` timesteps (one micro-step each).
    """

    world_size: int
    prompts_per_epoch: int
    group_size: int
    samples_per_epoch: int          # N = P * G
    samples_per_rank: int           # n = N / W
    micro_batch_size: int           # m, per rank
    micro_batches_per_step: int     # a, per rank
    gradient_steps: int             # S
    timesteps: int                  # K per sample
    accumulation: int               # a * K micro-steps per optimizer step
    whole_groups: bool              # every global micro-batch holds whole groups (exact group centering)
    groups_local: bool              # ... and every rank's micro-batch holds whole groups (no cross-rank gather)

    @property
    def global_micro_batch(self) -> int:
        return self.world_size * self.micro_batch_size

    def rank_indices(self, rank: int) -> torch.Tensor:
        """Global sample indices of ``rank`` in processing order (micro-batch j = rows j*m .. j*m+m-1)."""
        m, gm = self.micro_batch_size, self.global_micro_batch
        blocks = torch.arange(self.samples_per_epoch // gm).unsqueeze(1) * gm
        return (blocks + rank * m + torch.arange(m).unsqueeze(0)).reshape(-1)


def eligible_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """How many of the sampler's N sigmas (noisiest first) are trained on: ``int(N * fraction)``, at least 1."""
    return max(1, int(num_steps * timestep_fraction))


def derive_batch(world_size: int, prompts_per_epoch: int, group_size: int, micro_batch_size: int,
                 gradient_steps_per_epoch: int, timesteps: int, *, exact_groups: bool = True) -> BatchLayout:
    """The one derivation of per-rank batch sizes, accumulation and micro-batch layout (ConfigError if impossible).

    Needs ``N = P*G`` samples to split into ``S`` optimizer steps of whole global micro-batches
    (``N % (S * W * m) == 0``) and, for exact group centering (``exact_groups``), every global micro-batch to hold
    whole groups (``(W * m) % G == 0``).
    """
    W, P, G, m, S, K = world_size, prompts_per_epoch, group_size, micro_batch_size, gradient_steps_per_epoch, timesteps
    for name, v in (("world size", W), ("data.prompts_per_epoch", P), ("data.group_size", G),
                    ("train.micro_batch_size", m), ("train.gradient_steps_per_epoch", S), ("timesteps", K)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    N, gm = P * G, W * m
    if N % (S * gm):
        raise ConfigError(
            f"batch arithmetic: prompts_per_epoch * group_size = {P} * {G} = {N} samples must split into "
            f"gradient_steps_per_epoch * world_size * micro_batch_size = {S} * {W} * {m} = {S * gm} per chunk, "
            f"but {N} % {S * gm} = {N % (S * gm)}; change data.prompts_per_epoch, train.micro_batch_size or "
            f"train.gradient_steps_per_epoch")
    whole = gm % G == 0
    if exact_groups and not whole:
        raise ConfigError(
            f"batch arithmetic: exact group centering needs whole groups in every global micro-batch, but "
            f"world_size * micro_batch_size = {W} * {m} = {gm} is not a multiple of group_size {G} "
            f"({gm} % {G} = {gm % G}); make train.micro_batch_size a multiple of {G // math.gcd(G, W)} "
            f"or use centering 'batch'")
    a = N // (S * gm)
    return BatchLayout(world_size=W, prompts_per_epoch=P, group_size=G, samples_per_epoch=N,
                       samples_per_rank=N // W, micro_batch_size=m, micro_batches_per_step=a, gradient_steps=S,
                       timesteps=K, accumulation=a * K, whole_groups=whole, groups_local=m % G == 0)
