"""A light :class:`engine.context.Context` for driving a method's own ``advantages``/``update`` on a toy model
without DeepSpeed, data or rewards: the real method code, a plain-torch stepper, an emulated rank."""
from __future__ import annotations

import torch

from engine.batch import derive_batch
from engine.config import Config
from engine.context import Context
from engine.distributed import Dist


class EmulatedRank(Dist):
    """Rank ``rank`` of ``world_size`` in one process: collectives return this rank's own values (so reduced metrics
    are this rank's; gradients are compared by the test itself)."""

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return x


def light_context(method, model, stepper, *, prompts_per_epoch: int, group_size: int, micro_batch_size: int,
                  gradient_steps: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                  kernel_backend: str = "auto", epoch: int = 0) -> Context:
    """``method`` (an instance; ``method.cfg`` is the run config) on ``model`` through ``stepper``, as rank ``rank``
    of ``world_size`` (emulated by :class:`EmulatedRank`)."""
    cfg = method.cfg
    cfg.seed, cfg.train.kernel_backend = seed, kernel_backend
    cfg.data.prompts_per_epoch, cfg.data.group_size = prompts_per_epoch, group_size
    cfg.train.micro_batch_size, cfg.train.gradient_steps_per_epoch = micro_batch_size, gradient_steps
    layout = derive_batch(world_size, prompts_per_epoch, group_size, micro_batch_size, gradient_steps, 1,
                          exact_groups=method.exact_groups)
    dist = EmulatedRank(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    return Context(cfg=cfg, method=method, dist=dist, layout=layout, model=model, engine=None, stepper=stepper,
                   snapshots=None, prompts=None, test_prompts=None, rewards=None, sampler=None, logger=None,
                   checkpointer=None, epoch=epoch)


def run_config(method: str, algo) -> Config:
    """The default run config with ``algo`` as the method's options."""
    cfg = Config()
    cfg.method, cfg.algo = method, algo
    return cfg
