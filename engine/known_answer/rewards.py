"""The known-answer world's rewards (``engine.rewards.REWARDS["gmm"]``): each "image" is the ``[d]`` point itself
(the gmm family's ``decode`` is the identity) and is scored with its prompt's closed-form reward
(``models.gmm.PromptWorld.reward``: linear, quadratic or flat). Differentiable, so DIDR can use it.

Recipe: ``rewards: [{name: gmm, kwargs: {world: several, dim: 2}}]`` (the same world and dim as ``model.size``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from models.gmm import WORLDS, build_world


class WorldReward:
    """``R(x | prompt)`` of a known-answer world for ``x [N, d]``; ``score`` also returns ``gmm_<prompt>``: the
    reward of the rows of that prompt, NaN-free (0 elsewhere), with ``gmm_is_<prompt>`` masks, so per-prompt means
    can be formed from the logged components."""

    differentiable = True

    def __init__(self, world: str = "several", dim: int = 2, per_prompt: bool = False) -> None:
        if world not in WORLDS:
            raise ValueError(f"gmm reward: unknown world {world!r}; worlds: {', '.join(WORLDS)}")
        self.name = "gmm"
        self.world_name, self.dim, self.per_prompt = world, int(dim), bool(per_prompt)
        self.world = build_world(world, self.dim)
        self.by_prompt = {w.prompt: w for w in self.world}

    def _rows(self, x: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"gmm reward ({self.world_name}, dim {self.dim}) expects points [N, {self.dim}], got "
                             f"{tuple(x.shape)}")
        if len(prompts) != x.shape[0]:
            raise ValueError(f"gmm reward: {x.shape[0]} points but {len(prompts)} prompts")
        unknown = sorted({p for p in prompts if p not in self.by_prompt})
        if unknown:
            raise ValueError(f"gmm reward: prompts {unknown[:3]} are not in world {self.world_name!r} "
                             f"(its prompts: {', '.join(self.by_prompt)})")
        rows = {}
        for p in self.by_prompt:
            idx = [i for i, q in enumerate(prompts) if q == p]
            if idx:
                rows[p] = torch.tensor(idx, dtype=torch.long, device=x.device)
        return rows

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()
                             ) -> torch.Tensor:
        """``[N]`` rewards with autograd through ``images`` (in their dtype)."""
        out = images.new_zeros(images.shape[0]) if images.ndim else images
        for p, idx in self._rows(images, prompts).items():
            out = out.index_put((idx,), self.by_prompt[p].reward(images[idx]))
        return out

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()
              ) -> dict[str, torch.Tensor]:
        r = self.score_differentiable(images.float(), prompts, metadata).float()
        out = {"gmm": r}
        if self.per_prompt:
            for p in self.by_prompt:
                mask = torch.tensor([q == p for q in prompts], dtype=torch.float32, device=r.device)
                out[f"gmm_{p}"] = r * mask
                out[f"gmm_is_{p}"] = mask
        return out
