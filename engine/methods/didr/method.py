"""DIDR in the engine loop (``--method didr``)."""
from __future__ import annotations

import math

import torch

from engine.errors import ConfigError
from engine.methods import Method, register
from engine.methods.common import step_slices
from engine.methods.didr.config import DIDRConfig
from engine.methods.didr.core import DIDR
from engine.methods.didr.math import adapter_params
from engine.methods.didr.warm_start import WarmStart
from engine.stepper import TorchStepper
from engine.streams import Stream
from models.base import Cond


@register("didr")
class DIDRMethod(Method):
    """DIDR in the engine loop (``--method didr``): no scored rollouts (the loop skips decode/reward/advantages);
    ``rollout`` draws the epoch's latent noise per global sample; ``update`` runs, per optimizer step of the batch
    layout, ``ta_steps`` TA updates then one generator update with the differentiable reward ``ctx.rewards``."""

    Config = DIDRConfig
    adapters = ("policy", "fake")
    needs_rewards = False
    exact_groups = False

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._core: DIDR | None = None
        self._opts: tuple[TorchStepper, TorchStepper] | None = None
        self._pending_opt_state: dict | None = None  # from a checkpoint, applied when the optimizers exist
        self._warm = WarmStart(self.opt)

    def _setup(self, ctx) -> DIDR:
        """The generator wrapper, the checks and the two optimizers (once, at the first epoch)."""
        if self._core is None:
            o, t = self.opt, ctx.cfg.train
            # DIDR's two optimizers are its own, so its forwards bypass the DeepSpeed engine (whose output hooks
            # route every backward into the engine's single optimizer): the raw FlowModel, at ZeRO stage 0
            gen = ctx.model.flow
            if not callable(getattr(gen, "generate", None)):
                if o.one_step != "flow":
                    raise ConfigError(f"DIDR needs a one-step generator, but model.family {ctx.cfg.model.family!r} "
                                      f"is a multi-step flow model: set didr.one_step=flow (a one-step flow "
                                      f"generator x0 = z - v(z, 1) initialised from it) or load a one-step UNet")
                from models.onestep import FlowOneStep
                gen = FlowOneStep(gen)
            self._core = DIDR(o, gen, ctx.rewards)
            dist = ctx.dist if ctx.dist.world_size > 1 else None
            kw = dict(weight_decay=t.weight_decay, betas=t.betas, grad_clip=t.grad_clip, average_over=dist)
            self._opts = (TorchStepper(adapter_params(gen, "policy"), lr=t.lr, **kw),
                          TorchStepper(adapter_params(gen, "fake"), lr=o.ta_lr or t.lr, **kw))
            if self._pending_opt_state is not None:
                self._opts[0].load_state_dict(self._pending_opt_state["generator_opt"])
                self._opts[1].load_state_dict(self._pending_opt_state["ta_opt"])
                self._pending_opt_state = None
        return self._core

    def rank_state(self) -> dict:
        """The generator's and the TA's AdamW states (DIDR's own optimizers: DeepSpeed does not save them)."""
        if self._opts is None:
            return {}
        return {"generator_opt": self._opts[0].state_dict(), "ta_opt": self._opts[1].state_dict()}

    def load_rank_state(self, state: dict) -> None:
        if not state:
            return
        if set(state) != {"generator_opt", "ta_opt"}:
            raise ValueError(f"DIDR: checkpointed method state has keys {sorted(state)}, expected "
                             f"['generator_opt', 'ta_opt']")
        self._pending_opt_state = state

    def rollout(self, ctx, batch):
        from engine.rollout import rank_samples, sample_noise

        self._setup(ctx)
        ro = rank_samples(ctx, batch)
        cfg = ctx.cfg
        shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
        ro.extras["z"] = sample_noise(ro.global_idx, shape, seed=cfg.seed, epoch=ro.epoch, stream=Stream.INIT_NOISE,
                                      device=ctx.dist.device)
        return ro

    def _draws(self, ctx, ro, sl: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample (sigma, eps) for each TA step and the generator step, keyed by the global sample index."""
        from engine.rollout import sample_noise

        cfg, k = ctx.cfg, self.opt.ta_steps + 1
        idx, z = ro.global_idx[sl], ro.extras["z"][sl]
        u = sample_noise(idx, (k,), seed=cfg.seed, epoch=ro.epoch, stream=Stream.DIDR_SIGMA, device=z.device)
        u = 0.5 * (1 + torch.erf(u / math.sqrt(2)))  # standard normal -> U(0, 1)
        eps = sample_noise(idx, (k, *z.shape[1:]), seed=cfg.seed, epoch=ro.epoch, stream=Stream.DIDR_EPS,
                           device=z.device, dtype=z.dtype)
        return [(self._core.sigma_from_uniform(u[:, j]), eps[:, j]) for j in range(k)]

    def update(self, ctx, ro, adv) -> list[dict]:
        core = self._setup(ctx)
        self._warm.run(ctx, core, self._opts[1])
        gen_opt, ta_opt = self._opts
        results = []
        for step in step_slices(ctx.layout):
            sl = slice(step[0].start, step[-1].stop)  # this rank's samples of the optimizer step
            stats, norms = core.train_step(ro.extras["z"][sl], ro.cond.index(sl), ro.prompts[sl], ro.metadata[sl],
                                           generator_opt=gen_opt, ta_opt=ta_opt,
                                           micro_batch_size=ctx.layout.micro_batch_size,
                                           draws=self._draws(ctx, ro, sl))
            metrics = stats.reduce(ctx.dist)
            metrics.update({k: float(v) for k, v in norms.items() if v is not None})  # one host read per step
            metrics["lr"] = gen_opt.metrics()["lr"]
            results.append(metrics)
        return results

    @torch.no_grad()
    def eval_sample(self, ctx, noise: torch.Tensor, cond: Cond, adapter: str = "policy") -> torch.Tensor:
        """What DIDR trains is the one-step generator: evaluation samples are ``g(z, c)`` with ``adapter``
        (a hook for the engine's evaluation, instead of its multi-step ODE)."""
        return self._setup(ctx).generator.generate(noise, cond, adapter=adapter)
