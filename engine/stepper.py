"""The one optimizer stepper: backward, the accumulation boundary, clipping, the optimizer step and its metrics.

Every method trains through a stepper (``ctx.stepper`` over the DeepSpeed engine, or :class:`TorchStepper` for an
optimizer a method owns itself, DIDR's two); methods never touch the DeepSpeed engine. The contract of both:

- the gradient of an optimizer step is the SUM of the losses backwarded since the previous step (a method scales
  its losses: CRD/NFT by ``1 / layout.accumulation``, FDFO by its items per step);
- ``backward(loss, last=True)`` ends the step: the optimizer steps right after that backward (clipping at
  ``train.grad_clip``);
- ``metrics()`` is the last step's gradient norm (before clipping) and learning rate: one host read each, once per
  optimizer step (never inside micro-steps).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from engine.nvtx_ranges import nvtx_range


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """L2 norm of the gradients of ``params`` (on device, no host sync); None when none has a gradient."""
    grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class EngineStepper:
    """The stepper over a DeepSpeed engine (any ZeRO stage). The method says which backward ends the step, so the
    boundary never depends on DeepSpeed's micro-step counter (a stacked micro-batch or FDFO's shuffled items do a
    varying number of backwards per step); losses are not rescaled by DeepSpeed's accumulation count."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._norm: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        engine = self._engine
        with nvtx_range("train/backward"):
            engine.set_gradient_accumulation_boundary(bool(last))
            engine.backward(loss, scale_wrt_gas=False)
        with nvtx_range("train/optimizer_step"):
            if last and engine.zero_optimization_stage() == 0:
                # without ZeRO DeepSpeed clips fp32 gradients without keeping their norm: measure it first
                self._norm = grad_norm(engine.module.parameters())
            engine.step()  # every micro-step (DeepSpeed's counters); the optimizer acts at the boundary

    def metrics(self) -> dict:
        engine, out = self._engine, {}
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = self._norm
        if norm is not None:
            out["grad_norm"] = float(norm)
        out["lr"] = float(engine.get_lr()[0])
        return out


class TorchStepper:
    """A plain-torch AdamW stepper (a method's own optimizer, or engine-free tests). At the end of a step NaN/inf
    gradients are zeroed on device, gradients are averaged over ``average_over``'s ranks (one flat all-reduce),
    clipped to ``grad_clip`` (0 = no clipping; the norm is still measured), the optimizer steps and gradients are
    cleared. ``state_dict``/``load_state_dict`` are the optimizer's (checkpointed by the method that owns it)."""

    def __init__(self, params, *, lr: float, weight_decay: float = 1e-4, betas=(0.9, 0.999), grad_clip: float = 1.0,
                 average_over: Any = None):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("TorchStepper: no trainable parameters (requires_grad) were given")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.grad_clip = grad_clip
        #: an engine ``Dist``: gradients are averaged over its ranks at the end of each step
        self.average_over = average_over
        self.last_norm: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        with nvtx_range("train/backward"):
            loss.backward()
        if last:
            with nvtx_range("train/optimizer_step"):
                self._step()

    def _step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        dist = self.average_over
        if dist is not None and dist.world_size > 1:
            for p in self.params:  # every rank reduces the same buffer, also where a rank had no gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = dist.all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in self.params]))
            flat /= dist.world_size
            offset = 0
            for p in self.params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_norm = norm.detach()

    def metrics(self) -> dict:
        out = {"lr": float(self.optimizer.param_groups[0]["lr"])}
        if self.last_norm is not None:
            out["grad_norm"] = float(self.last_norm)
        return out

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
