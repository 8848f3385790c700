"""``AsyncRewards``: score batch k in a thread pool while the rollout samples batch k+1; ``ChunkScoring``: the
loop's rollout chunks scored that way (``train.overlap_rewards``).

Reward models spend their time in torch ops, Tesseract subprocesses or HTTP calls, all of which release the GIL, so
a thread overlaps them with sampling. ``submit`` returns a ``concurrent.futures.Future``; ``next_result`` returns
results strictly in submission order whatever the number of workers.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from .base import Reward


class AsyncRewards:
    """Wrap a ``Reward`` (or a ``RewardSet``) so it scores in background threads. It is itself a ``Reward``:
    ``score`` waits for its own batch."""

    def __init__(self, reward: Reward, max_workers: int = 1, copy_images: bool = True) -> None:
        if max_workers < 1:
            raise ValueError(f"AsyncRewards: max_workers must be >= 1, got {max_workers}")
        self.reward = reward
        self.name = reward.name
        self.differentiable = reward.differentiable
        #: clone images on submit, so the caller may reuse its buffers while the batch is scored
        self.copy_images = copy_images
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"reward-{reward.name}")
        self._pending: deque[Future] = deque()

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Future:
        """Start scoring this batch; the future's result is what ``reward.score`` returns (also queued for
        ``next_result``)."""
        future = self.start(images, prompts, metadata)
        self._pending.append(future)
        return future

    def start(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Future:
        """Like ``submit`` but not queued for ``next_result`` (the caller keeps the future)."""
        images = images.detach()
        if self.copy_images:
            images = images.clone()
        return self._pool.submit(self.reward.score, images, list(prompts), list(metadata))

    def next_result(self, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """The result of the oldest batch not yet collected (FIFO), waiting for it if needed."""
        if not self._pending:
            raise RuntimeError("AsyncRewards.next_result: no batch was submitted")
        return self._pending.popleft().result(timeout)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self.start(images, prompts, metadata).result()

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                             ) -> torch.Tensor:
        # autograd graphs are built in the caller's thread: run synchronously
        return self.reward.score_differentiable(images, prompts, metadata)

    def close(self) -> None:
        """Wait for running batches and stop the threads."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "AsyncRewards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChunkScoring:
    """Score a rollout chunk by chunk while the sampler draws the next one (``train.overlap_rewards``).

    ``add(start, stop, x0, prompts, metadata)`` (called by ``engine.rollout.ode_rollout`` after each sampler call)
    decodes the chunk in the caller's thread and hands it to ONE worker thread, which scores the chunks in order in
    the grad mode of the thread that built this scorer (the loop's, as when it scores after the rollout).
    ``result()`` waits and returns ``(images, scores)`` exactly as one ``decode`` + ``score`` of the whole rollout
    would, for rewards and decoders that treat each sample on its own (batched reward networks may round in the last
    bits with the batch size; a reward drawing from torch's global RNG interleaves its draws differently): the
    chunks are concatenated in rollout order; a score key a chunk lacks (the extras of a component that failed on
    that chunk) is NaN there; ``rewards.last_errors`` holds every chunk's messages. A component that raises
    invalidates the chunk it was given (the batch it was called with), as it invalidates the whole rollout when
    scored after; NaN scores invalidate their samples alike, and the method's bad-reward policy sees the same mask.
    """

    def __init__(self, rewards, decode) -> None:
        self.rewards, self.decode = rewards, decode
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-overlap")
        self._chunks: list[tuple[int, int, torch.Tensor, Future]] = []
        self._grad = torch.is_grad_enabled()  # grad mode is per thread; the sampler's no_grad is not the loop's

    def add(self, start: int, stop: int, x0: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
        images = self.decode(x0)
        self._chunks.append((start, stop, images, self._pool.submit(self._score, images, list(prompts),
                                                                    list(metadata))))

    def _score(self, images, prompts, metadata):
        with torch.set_grad_enabled(self._grad):
            out = self.rewards.score(images, prompts, metadata)
        return out, dict(getattr(self.rewards, "last_errors", None) or {})

    def covers(self, n: int) -> bool:
        """Whether the chunks received are exactly rows ``0 .. n`` in order (else the loop scores after)."""
        stops = [0] + [c[1] for c in self._chunks]
        return n > 0 and stops[-1] == n and all(c[0] == s for c, s in zip(self._chunks, stops))

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        results = [c[3].result() for c in self._chunks]
        keys = list(dict.fromkeys(k for out, _ in results for k in out))
        scores = {}
        for k in keys:
            ref = next(out[k] for out, _ in results if k in out)
            fill = False if ref.dtype == torch.bool else float("nan")
            scores[k] = torch.cat([out[k] if k in out else torch.full((c[1] - c[0],), fill, dtype=ref.dtype)
                                   for (out, _), c in zip(results, self._chunks)])
        errors: dict[str, list[str]] = {}
        for (_, errs), c in zip(results, self._chunks):
            for k, msg in errs.items():
                errors.setdefault(k, []).append(f"rows {c[0]}-{c[1] - 1}: {msg}")
        if hasattr(self.rewards, "last_errors"):
            self.rewards.last_errors = {k: "; ".join(v) for k, v in errors.items()}
        return torch.cat([c[2] for c in self._chunks]), scores

    def close(self) -> None:
        """Stop taking chunks; batches already handed over still finish (``result`` waits for them)."""
        self._pool.shutdown(wait=False)
