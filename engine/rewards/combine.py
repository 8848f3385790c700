"""``RewardSet``: the weighted combination of several rewards that the engine trains on.

``score`` returns every component (so each is logged), ``"reward"`` (the weighted total) and ``"valid"`` (bool [N]).
A component that raises, returns NaN/inf, or returns the wrong shape makes those samples invalid: their total is NaN
and ``valid`` is False, and the reason is kept in ``last_errors``. Nothing is ever filled in silently; the engine
drops the groups of invalid samples.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from .async_backend import AsyncRewards
from .base import Reward

log = logging.getLogger(__name__)


@dataclass
class WeightedReward:
    """One component: the reward, its weight in the total and its key in the output dict."""

    reward: Reward
    weight: float
    key: str


class RewardSet:
    """Weighted sum of rewards. Output keys: ``key`` (main score of each component), ``key/extra`` for a component's
    extra outputs (a leading ``"<reward.name>_"`` is dropped from the extra's name), ``"reward"`` and ``"valid"``."""

    def __init__(self, components: Sequence[WeightedReward]) -> None:
        if not components:
            raise ValueError("RewardSet needs at least one reward")
        keys = [c.key for c in components]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"RewardSet: duplicate reward keys {dup}; give each spec a distinct 'key'")
        for k in keys:
            if k in ("reward", "valid") or "/" in k:
                raise ValueError(f"RewardSet: reward key {k!r} is reserved or contains '/'")
        self.components = list(components)
        #: per-component error messages of the last ``score`` call (empty when every sample was valid)
        self.last_errors: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        return "reward"

    @property
    def differentiable(self) -> bool:
        return all(c.reward.differentiable for c in self.components if c.weight != 0)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Score every component (async components concurrently) and combine them; see the module docstring."""
        n = _check_batch(images, prompts, metadata)
        # components with their own pool (AsyncRewards) start first and run while the local ones compute
        pending = {c.key: c.reward.start(images, prompts, metadata)
                   for c in self.components if isinstance(c.reward, AsyncRewards)}
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(n, dtype=torch.float32)
        valid = torch.ones(n, dtype=torch.bool)
        self.last_errors = {}
        for c in self.components:
            try:
                result = pending[c.key].result() if c.key in pending else c.reward.score(images, prompts, metadata)
                main, extras = _split_result(result, c.reward, n)
            except Exception as e:  # a failing reward invalidates its samples; the run goes on
                self.last_errors[c.key] = f"{type(e).__name__}: {e}"
                log.warning("reward %r failed on a batch of %d: %s", c.key, n, self.last_errors[c.key])
                main, extras = torch.full((n,), float("nan")), {}
            bad = ~torch.isfinite(main)
            if bool(bad.any()) and c.key not in self.last_errors:
                self.last_errors[c.key] = f"{int(bad.sum())} of {n} scores are NaN or infinite"
            valid &= ~bad
            out[c.key] = main
            for extra, value in extras.items():
                out[f"{c.key}/{extra}"] = value
            total += c.weight * main
        out["reward"] = torch.where(valid, total, torch.full_like(total, float("nan")))
        out["valid"] = valid
        return out

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                             ) -> torch.Tensor:
        """Weighted total with autograd through ``images``; TypeError if a weighted component is not differentiable."""
        blocked = [c.key for c in self.components if c.weight != 0 and not c.reward.differentiable]
        if blocked:
            raise TypeError(f"RewardSet.score_differentiable: rewards {blocked} are not differentiable "
                            "(use a differentiable reward such as clip_score, pickscore, hps, aesthetic, "
                            "testbed_classifier, or give these weight 0)")
        total = None
        for c in self.components:
            if c.weight == 0:
                continue
            s = c.weight * c.reward.score_differentiable(images, prompts, metadata).float()
            total = s if total is None else total + s
        return total

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Future:
        """Score the whole set in a background thread (one worker: batches finish in submission order)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardset")
        return self._pool.submit(self.score, images.detach(), list(prompts), list(metadata))

    def close(self) -> None:
        """Stop background threads (of the set and of its async components)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for c in self.components:
            if hasattr(c.reward, "close"):
                c.reward.close()


def _check_batch(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> int:
    # [N, d] points are the "images" of the known-answer family (models/gmm.py, decode = identity)
    if not isinstance(images, torch.Tensor) or not (images.dim() == 2 or (images.dim() == 4 and images.shape[1] == 3)):
        raise ValueError(f"rewards: images must be a float tensor [N, 3, H, W] in [0, 1] (or [N, d] points), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    n = images.shape[0]
    if len(prompts) != n or len(metadata) != n:
        raise ValueError(f"rewards: {n} images but {len(prompts)} prompts and {len(metadata)} metadata entries")
    return n


def _split_result(result: dict, reward: Reward, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The main score and the extras of one reward's output, as float32 [n] CPU tensors."""
    if not isinstance(result, dict) or reward.name not in result:
        raise ValueError(f"reward {reward.name!r} returned {type(result).__name__} without key {reward.name!r}")
    out = {}
    for k, v in result.items():
        v = torch.as_tensor(v).detach().to("cpu", torch.float32)
        if v.shape != (n,):
            raise ValueError(f"reward {reward.name!r} returned {k!r} of shape {tuple(v.shape)}, expected ({n},)")
        out[k] = v
    main = out.pop(reward.name)
    prefix = reward.name + "_"
    return main, {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in out.items()}
