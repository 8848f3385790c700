"""DIDR on a one-step generator: the TA (fake score) and generator losses and one iteration (``train_step``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from engine.methods.didr.config import DIDRConfig
from engine.methods.didr.math import (bcast_sigma, check_generator, check_reward, diffused_reward_proxy, dmd_weight,
                                      generator_surrogate, regression_loss, score_from_velocity,
                                      ta_flow_matching_loss, to_accumulation, x0_space_factor)
from engine.nvtx_ranges import nvtx_range
from engine.runlog import StepStats
from models.base import Cond, as_sigma_batch


class DIDR:
    """DIDR on a one-step generator, without the engine (a model, two steppers, tensors). Networks are addressed
    through adapters: ``generator.generate(z, cond)`` runs the policy; the reference is
    ``teacher.velocity(..., adapter=teacher_adapter)`` (default: the generator's own ``pretrained`` adapter) and the
    fake score ``fake.velocity(..., adapter="fake")`` (default: the generator's ``fake`` adapter, initialised from
    the teacher by the adapter protocol). ``reward`` is differentiable: ``score_differentiable(images, prompts,
    metadata) -> [N]``; ``decode`` maps x0 to images in [0, 1] (default: ``generator.decode``).
    """

    def __init__(self, cfg: DIDRConfig, generator: Any, reward: Any, *, teacher: Any | None = None,
                 teacher_adapter: str = "pretrained", fake: Any | None = None, fake_adapter: str = "fake",
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        cfg.validate()
        check_generator(generator)
        check_reward(reward)
        self.cfg = cfg
        self.generator = generator
        self.reward = reward
        self.teacher = teacher if teacher is not None else generator
        self.teacher_adapter = teacher_adapter
        self.fake = fake if fake is not None else generator
        self.fake_adapter = fake_adapter
        # reward gradients need autograd through the decoder (VAE families keep ``decode`` itself under no_grad)
        self.decode = decode or getattr(generator, "decode_differentiable", None) or generator.decode

    # -- networks ---------------------------------------------------------------------------------------------
    def ref_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, *, cfg: bool = True) -> torch.Tensor:
        """Reference (teacher) velocity with CFG omega (one batched cond+null pass) or conditional only."""
        scale = self.cfg.cfg_scale if cfg else 1.0
        if scale == 1.0:
            return self.teacher.velocity(x, sigma, cond, adapter=self.teacher_adapter)
        return self.teacher.guided_velocity(x, sigma, cond, scale, adapter=self.teacher_adapter)

    def fake_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.fake.velocity(x, sigma, cond, adapter=self.fake_adapter)

    def reward_of_x0(self, x0: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        """Differentiable reward of latents: decode to images in [0, 1], then ``score_differentiable`` -> [B]."""
        images = self.decode(x0)
        if x0.requires_grad and not images.requires_grad:
            raise ValueError(f"DIDR: {type(self.generator).__name__}.decode cut the gradient (it runs under no_grad); "
                             f"the model needs decode_differentiable(x0) for reward gradients")
        return to_accumulation(self.reward.score_differentiable(images, prompts, metadata))

    def draw(self, n: int, like: torch.Tensor, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma ~ U[sigma_min, sigma_max] [n] fp32, eps ~ N(0, I) like ``like``)."""
        u = torch.rand(n, generator=generator, device=like.device, dtype=torch.float32)
        eps = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return self.sigma_from_uniform(u), eps

    def sigma_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return self.cfg.sigma_min + (self.cfg.sigma_max - self.cfg.sigma_min) * u

    @torch.no_grad()
    def reference_sample(self, z: torch.Tensor, cond: Cond, steps: int) -> torch.Tensor:
        """The reference's own sample from noise ``z``: ``steps`` Euler steps of the CFG velocity (omega =
        ``cfg_scale``) on the teacher's schedule, in at least float32 (the targets of the regression initialisation)."""
        x = to_accumulation(z)
        sigmas = self.teacher.sigmas(steps).to(z.device, torch.float32)
        for i in range(sigmas.numel() - 1):
            sig = sigmas[i].expand(x.shape[0])
            x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * to_accumulation(self.ref_velocity(x, sig, cond))
        return x

    def regression_loss(self, z: torch.Tensor, cond: Cond, target: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mean_pix (g(z, c) - target)^2`` with the generator's gradient."""
        loss = regression_loss(self.generator.generate(z, cond), target)
        return loss, {"reg_loss": loss.detach()}

    # -- Stage I ----------------------------------------------------------------------------------------------
    def ta_loss(self, z: torch.Tensor, cond: Cond, generator: torch.Generator | None = None, *,
                sigma: torch.Tensor | None = None, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching loss of the fake score on ``sg(g(z, c))`` at ``sigma ~ U[sigma_min, sigma_max]``
        (``sigma``/``eps`` drawn from ``generator`` unless given)."""
        with torch.no_grad():
            x0 = self.generator.generate(z, cond)
        if sigma is None or eps is None:
            sigma, eps = self.draw(x0.shape[0], x0, generator)
        eps = eps.to(x0.dtype)
        x_t = (1 - bcast_sigma(sigma, x0)) * x0 + bcast_sigma(sigma, x0) * eps
        loss = ta_flow_matching_loss(self.fake_velocity(x_t, sigma, cond), x0, eps)
        return loss, {"ta_loss": loss.detach()}

    # -- Stage II ---------------------------------------------------------------------------------------------
    def generator_loss(self, z: torch.Tensor, cond: Cond, prompts: Sequence[str], metadata: Sequence[dict],
                       generator: torch.Generator | None = None, *, sigma: torch.Tensor | None = None,
                       eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator surrogate on ``x0 = g(z, c)`` (``sigma``/``eps`` drawn from ``generator`` unless given)."""
        x0 = self.generator.generate(z, cond)
        if sigma is None or eps is None:
            sigma, eps = self.draw(x0.shape[0], x0, generator)
        return self.generator_loss_at(x0, sigma, eps.to(x0.dtype), cond, prompts, metadata)

    def generator_loss_at(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond: Cond,
                          prompts: Sequence[str], metadata: Sequence[dict]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage II for given generator output ``x0`` (with grad), ``sigma`` [B] and ``eps``: (loss, stats)."""
        cfg = self.cfg
        b = x0.shape[0]
        sigma = as_sigma_batch(sigma, b, x0).clamp(cfg.sigma_min, cfg.sigma_max)
        x_t = (1 - bcast_sigma(sigma, x0)) * x0 + bcast_sigma(sigma, x0) * eps
        x_t_sg = x_t.detach()
        with torch.no_grad():
            v_ref = self.ref_velocity(x_t_sg, sigma, cond)
            v_fake = self.fake_velocity(x_t_sg, sigma, cond)
            d = (score_from_velocity(to_accumulation(x_t_sg), to_accumulation(v_fake), sigma)
                 - score_from_velocity(to_accumulation(x_t_sg), to_accumulation(v_ref), sigma))
            x0_hat_ref = x_t_sg - bcast_sigma(sigma, x_t_sg) * v_ref
            if cfg.weighting in ("dmd", "dmd_x0"):
                w = dmd_weight(x0, x0_hat_ref, cfg.weight_floor)
                if cfg.weighting == "dmd_x0":
                    w = w * x0_space_factor(sigma.to(w.device, w.dtype))
            else:
                w = torch.ones(b, device=x0.device, dtype=d.dtype)
        dims = tuple(range(1, x0.ndim))
        stats = {"w": w, "d_rms": d.pow(2).mean(dims).sqrt()}
        rw = cfg.reward_weight
        if cfg.reward_mode == "diffused":
            if rw != 0:
                s_r, r_drp = diffused_reward_proxy(
                    x_t_sg, sigma, lambda x: self.reward_of_x0(x, prompts, metadata),
                    lambda x, s: self.ref_velocity(x, s, cond, cfg=cfg.drp_cfg), steps=cfg.drp_steps, beta=cfg.beta)
                if rw != 1:
                    s_r = rw * s_r
                stats.update(reward_drp=r_drp)
            else:  # reward off: pure distribution matching to the reference
                s_r = torch.zeros_like(d)
            loss = generator_surrogate(x_t, d - s_r, w)
            with torch.no_grad():  # the reward of the generator's own samples (monitoring only)
                r_x0 = self.reward_of_x0(x0.detach(), prompts, metadata)
            stats.update(reward=r_x0, drp_rms=s_r.pow(2).mean(dims).sqrt())
        else:  # DI++: the integral-KL surrogate plus the terminal reward through the generator
            if rw != 0:
                r = self.reward_of_x0(x0, prompts, metadata)
                loss = generator_surrogate(x_t, d, w) - (cfg.alpha * rw) * r.mean()
            else:
                with torch.no_grad():
                    r = self.reward_of_x0(x0.detach(), prompts, metadata)
                loss = generator_surrogate(x_t, d, w)
            stats.update(reward=r.detach())
        stats["generator_loss"] = loss.detach()
        return loss, stats

    # -- one iteration ----------------------------------------------------------------------------------------
    def train_step(self, z: torch.Tensor, cond: Cond, prompts: Sequence[str], metadata: Sequence[dict], *,
                   generator_opt: Any, ta_opt: Any, generator: torch.Generator | None = None,
                   micro_batch_size: int = 8, draws: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> tuple[StepStats, dict[str, torch.Tensor]]:
        """``ta_steps`` TA updates, then one generator update, on the batch ``z`` (micro-batched).

        ``generator_opt`` / ``ta_opt``: :class:`engine.stepper.TorchStepper` (``backward(loss, last=True)`` ends
        an optimizer step; ``last_norm`` its gradient norm before clipping).
        ``draws``: optional (sigma [n], eps [n, ...]) per TA step and a last one for the generator (per-sample draws
        from the engine); else drawn from ``generator``. Returns (per-sample stats, grad norms), no host sync.
        """
        n = z.shape[0]
        mb = max(1, min(micro_batch_size, n))
        chunks = [slice(a, min(a + mb, n)) for a in range(0, n, mb)]
        if draws is None:
            draws = [self.draw(n, z, generator) for _ in range(self.cfg.ta_steps + 1)]
        stats, norms = StepStats(), {}
        for t in range(self.cfg.ta_steps):
            sigma, eps = draws[t]
            for j, sl in enumerate(chunks):
                with nvtx_range("train/ta_loss"):
                    loss, st = self.ta_loss(z[sl], cond.index(sl), sigma=sigma[sl], eps=eps[sl])
                ta_opt.backward(loss * ((sl.stop - sl.start) / n), last=j == len(chunks) - 1)
                stats.add("ta_loss", st["ta_loss"].expand(sl.stop - sl.start))
            norms["ta_grad_norm"] = ta_opt.last_norm
        sigma, eps = draws[-1]
        for j, sl in enumerate(chunks):
            with nvtx_range("train/generator_loss"):
                loss, st = self.generator_loss(z[sl], cond.index(sl), prompts[sl], metadata[sl],
                                               sigma=sigma[sl], eps=eps[sl])
            generator_opt.backward(loss * ((sl.stop - sl.start) / n), last=j == len(chunks) - 1)
            for k, v in st.items():
                stats.add(k, v.expand(sl.stop - sl.start) if v.ndim == 0 else v)
        norms["grad_norm"] = generator_opt.last_norm
        return stats, norms
