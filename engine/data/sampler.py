"""The distributed, group-contiguous prompt sampler.

Each epoch draws P distinct prompts (a seeded permutation from ``(seed, epoch)``), repeats each G times, and gives
the j-th drawn prompt the global group id j (0..P-1). The flat list of P*G samples (group 0's G samples, then group
1's, ...) is split contiguously into ``world_size`` equal parts; rank r takes part r. When P is divisible by the world
size every rank holds P/W whole groups, so group statistics need only a small gather of detached per-sample scalars;
otherwise the groups listed in ``EpochBatch.straddling_groups`` are split between two (or more) neighbouring ranks.
Everything is a pure function of ``(seed, epoch)``: a resumed run continues exactly where it stopped.

With ``strata`` (one integer per prompt, e.g. its GenEval tag) the P prompts are drawn round-robin over the strata
in a random order, each stratum's prompts in a random order: every stratum gets P / (number of strata) prompts per
epoch (+-1) however many prompts it has (the testbed's training file is 71% colour-binding prompts).
"""
from __future__ import annotations

from dataclasses import dataclass

import zlib

import numpy as np
import torch


@dataclass(frozen=True)
class EpochBatch:
    """One epoch's samples on one rank.

    ``prompt_idx``/``group_ids``: LongTensor [n_local] (indices into the prompt set / global group ids);
    ``local_slice``: this rank's slice of the global flat sample list (length P*G);
    ``all_prompt_idx``/``all_group_ids``: the global flat lists (LongTensor [P*G]), identical on every rank;
    ``straddling_groups``: ids of groups whose samples lie on more than one rank (empty when P % W == 0).
    """

    epoch: int
    prompt_idx: torch.Tensor
    group_ids: torch.Tensor
    local_slice: slice
    all_prompt_idx: torch.Tensor
    all_group_ids: torch.Tensor
    straddling_groups: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.prompt_idx.numel())


class GroupSampler:
    """``GroupSampler(num_prompts, prompts_per_epoch, group_size, world_size, rank, seed).epoch(e) -> EpochBatch``."""

    def __init__(self, num_prompts: int, prompts_per_epoch: int, group_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, strata: "np.ndarray | list[int] | None" = None) -> None:
        for key, value, low in (("num_prompts", num_prompts, 1), ("prompts_per_epoch", prompts_per_epoch, 1),
                                ("group_size", group_size, 1), ("world_size", world_size, 1), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"GroupSampler: {key} must be an integer >= {low}, got {value!r}")
        if prompts_per_epoch > num_prompts:
            raise ValueError(f"GroupSampler: prompts_per_epoch={prompts_per_epoch} exceeds num_prompts={num_prompts} "
                             "(prompts are drawn without replacement within an epoch)")
        if not 0 <= rank < world_size:
            raise ValueError(f"GroupSampler: rank must be in [0, {world_size}), got {rank}")
        total = prompts_per_epoch * group_size
        if total % world_size:
            raise ValueError(f"GroupSampler: prompts_per_epoch * group_size = {prompts_per_epoch} * {group_size} = "
                             f"{total} samples do not split evenly over world_size={world_size} ranks")
        if strata is not None and len(strata) != num_prompts:
            raise ValueError(f"GroupSampler: {len(strata)} strata for {num_prompts} prompts")
        #: stratum id per prompt (None = uniform draws)
        self.strata = None if strata is None else np.asarray(strata, np.int64)
        self.num_prompts, self.prompts_per_epoch = int(num_prompts), int(prompts_per_epoch)
        self.group_size = int(group_size)
        self.world_size, self.rank, self.seed = int(world_size), int(rank), int(seed)
        self.samples_per_rank = total // world_size
        #: True when every rank holds whole groups (P divisible by the world size)
        self.groups_whole = prompts_per_epoch % world_size == 0

    def permutation(self, epoch: int) -> np.ndarray:
        """The P prompt indices drawn in ``epoch`` (distinct; seeded by ``(seed, epoch)`` only)."""
        if epoch < 0:
            raise ValueError(f"GroupSampler.epoch: epoch must be >= 0, got {epoch}")
        rng = np.random.default_rng([self.seed, int(epoch)])
        if self.strata is None:
            return rng.permutation(self.num_prompts)[: self.prompts_per_epoch]
        # stratified: column j of `table` holds stratum j's prompts in a random order (padded with -1); reading it
        # row by row (round k takes every stratum's k-th prompt, strata in a random order) balances the strata
        groups = [rng.permutation(np.flatnonzero(self.strata == s)) for s in rng.permutation(np.unique(self.strata))]
        table = np.full((max(len(g) for g in groups), len(groups)), -1, np.int64)
        for j, g in enumerate(groups):
            table[: len(g), j] = g
        order = table.ravel()
        return order[order >= 0][: self.prompts_per_epoch]

    def epoch(self, epoch: int) -> EpochBatch:
        """This rank's samples of ``epoch`` (see the module docstring for the layout)."""
        drawn = torch.from_numpy(self.permutation(epoch).astype(np.int64))
        all_group_ids = torch.arange(self.prompts_per_epoch, dtype=torch.long).repeat_interleave(self.group_size)
        all_prompt_idx = drawn.repeat_interleave(self.group_size)
        start = self.rank * self.samples_per_rank
        local = slice(start, start + self.samples_per_rank)
        return EpochBatch(epoch=int(epoch), prompt_idx=all_prompt_idx[local].clone(),
                          group_ids=all_group_ids[local].clone(), local_slice=local,
                          all_prompt_idx=all_prompt_idx, all_group_ids=all_group_ids,
                          straddling_groups=self.straddling_groups())

    def straddling_groups(self) -> tuple[int, ...]:
        """Group ids split across ranks: a group straddles when a rank boundary falls strictly inside it."""
        groups = set()
        for r in range(1, self.world_size):
            boundary = r * self.samples_per_rank
            if boundary % self.group_size:
                groups.add(boundary // self.group_size)
        return tuple(sorted(groups))

    def describe(self) -> str:
        """One sentence on the layout, for the run log."""
        head = (f"{self.prompts_per_epoch} prompts x {self.group_size} samples over {self.world_size} rank(s), "
                f"{self.samples_per_rank} samples per rank")
        if self.groups_whole:
            return f"{head}: {self.prompts_per_epoch // self.world_size} whole groups per rank"
        return f"{head}: groups {list(self.straddling_groups())} straddle rank boundaries"

    def state_dict(self) -> dict:
        """What a checkpoint stores to check that a resumed run uses the same sampler (epochs are seeded)."""
        return {"num_prompts": self.num_prompts, "prompts_per_epoch": self.prompts_per_epoch,
                "group_size": self.group_size, "world_size": self.world_size, "seed": self.seed,
                "strata": None if self.strata is None else f"crc32:{zlib.crc32(self.strata.tobytes()):08x}"}

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError when a checkpoint's sampler differs from this one (resume would draw other prompts)."""
        mine = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("GroupSampler: the checkpoint's sampler differs from this run's "
                             + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
