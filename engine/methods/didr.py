"""DIDR: Diff-Instruct with Diffused Reward, for one-step generators (spec/methods.md section 5).

No public code exists; this is the engine's defined reconstruction. Per iteration:

- Stage I (TA / fake score ``psi``): ``x0 = sg(g(z, c))``, ``sigma ~ U[sigma_min, sigma_max]``, flow-matching loss
  ``mean_pix (v_psi(x_sigma) - (eps - x0))^2``; ``ta_steps`` updates per generator update.
- Stage II (generator): ``x0 = g(z, c)``, ``x_t = (1 - sigma) x0 + sigma eps``;
  ``d = s_psi(x_t) - s_ref_cfg(x_t)`` (no grad; scores from velocities, ``s = -(x + (1 - sigma) v) / sigma``);
  Diffused Reward Proxy ``s_r_hat = (1/beta) grad_{x_t} r(Phi_K(sg(x_t)))`` with ``Phi_K`` the K-step deterministic
  Euler denoising by the reference (own autograd graph, then detached);
  ``loss_G = mean_i w_i * sum_pix(sg(d - s_r_hat) * x_t)``, ``w_i = 1 / sg(mean_pix |x0 - x0_hat_ref|)``.
- Ablation ``reward_mode="terminal"`` (DI++): ``loss_G = mean_i w_i * sum_pix(sg(d) * x_t) - alpha * mean_i r(g(z))``.
- ``weighting="dmd_x0"`` (a choice of ``w(sigma)``): ``w_i`` times ``sigma^2 / (1 - sigma)``, so that ``w_i d_i`` is
  DMD's x0-space difference ``(x0_hat_psi - x0_hat_ref) / mean_pix|x0 - x0_hat_ref|`` (the plain score difference
  carries ``(1 - sigma) / sigma^2`` and lets the lowest sigmas dominate the generator gradient).
- Generator initialisation (``init_regression_steps`` > 0, DMD's regression loss used as a warm start): before the
  first iteration of a fresh run, AdamW steps of ``mean_pix (g(z, c) - x_ref(z, c))^2`` on ``init_pairs`` pairs of
  noise and the reference's own CFG Euler ODE sample from that noise. A one-step flow generator built from a
  multi-step teacher otherwise starts at the teacher's mean image ``z - v(z, 1)`` (near-blank on the testbed).

Networks: ``generator`` is a one-step generator (``models/onestep.py``: ``generate(z, cond)`` and ``velocity``);
the reference (teacher) and the fake score are adapters of the same model by default (``pretrained`` and ``fake``),
or separate models when given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from engine.errors import ConfigError
from engine.runlog import StepStats
from engine.methods import Method, register
from engine.nvtx_ranges import nvtx_range
from engine.options import opt
from engine.stepper import TorchStepper
from engine.streams import DIDR_INIT_EPOCH, Stream
from models.base import Cond, as_sigma_batch

REWARD_MODES = ("diffused", "terminal")
WEIGHTINGS = ("dmd", "dmd_x0", "none")
ONE_STEP = ("auto", "flow")


@dataclass
class DIDRConfig:
    """DIDR options (YAML section ``didr``); every option has a working default.

    The generator's optimizer is the engine's ``train.*`` (lr, betas, weight decay, clip); the TA has its own lr.
    ``train.gradient_steps_per_epoch`` generator updates per epoch, each preceded by ``ta_steps`` TA updates on the
    same samples; ``data.prompts_per_epoch x data.group_size`` noise draws per epoch.
    """

    reward_mode: str = opt("diffused", "diffused (DIDR: the Diffused Reward Proxy) | terminal (DI++ ablation: "
                                        "-alpha r(g(z)) + IKL)")
    beta: float = opt(1.0, "reward temperature: target p* ~ p_ref exp(r / beta)")
    alpha: float = opt(1.0, "terminal mode: weight of the terminal reward")
    cfg_scale: float = opt(4.5, "CFG scale omega of the reference (teacher) score (1 = a single pass)")
    drp_steps: int = opt(1, "K: Euler steps of the reference denoising Phi_K inside the DRP (1 = Tweedie jump)")
    drp_cfg: bool = opt(True, "use the reference's CFG inside Phi_K too (else its conditional velocity)")
    ta_steps: int = opt(1, "fake-score (TA) updates per generator update")
    sigma_min: float = opt(0.02, "diffusion times ~ U[sigma_min, sigma_max]; > 0 keeps 1/sigma finite")
    sigma_max: float = opt(0.98, "upper end of the diffusion times")
    weighting: str = opt("dmd", "per-sample weight: dmd = 1 / sg(mean_pix|x0 - x0_hat_ref|) | dmd_x0 = the dmd "
                                 "weight times sigma^2 / (1 - sigma), which turns the score difference into DMD's "
                                 "x0-space difference (x0_hat_psi - x0_hat_ref) / mean_pix|x0 - x0_hat_ref| (the plain "
                                 "score difference grows like 1/sigma^2 and lets the lowest sigmas dominate) | none")
    weight_floor: float = opt(1e-4, "floor of the dmd weight's denominator")
    ta_lr: float = opt(0.0, "TA (fake score) AdamW lr; 0 = train.lr")
    one_step: str = opt("auto", "auto: the model must be a one-step generator (models/onestep.py UNetOneStep) | "
                                 "flow: a one-step flow generator x0 = z - v(z, 1) over any flow model")
    init_regression_steps: int = opt(0, "generator initialisation (DMD-style regression warm start): AdamW steps "
                                         "of mean_pix (g(z, c) - x_ref(z, c))^2 on (noise, reference ODE sample) "
                                         "pairs before the first DIDR iteration (0 = off: g starts as the raw "
                                         "one-step teacher, whose x0 = z - v(z, 1) is the teacher's mean image)")
    init_pairs: int = opt(512, "(noise, reference sample) pairs of the warm start, on the training prompts")
    init_ode_steps: int = opt(10, "Euler steps of the reference ODE (with CFG cfg_scale) that makes the pairs")
    init_batch_size: int = opt(16, "pairs per warm-start step (all ranks together)")
    init_lr: float = opt(0.0, "warm-start AdamW lr (its own optimizer, discarded after); 0 = train.lr")
    init_ta_steps: int = opt(0, "fake-score warm-up: TA updates (its own optimizer and ta_lr) on the initialised "
                                 "generator's samples of the pair noises, after the regression warm start and "
                                 "before the first generator update (0 = off: the fake score starts as the "
                                 "teacher and tracks the generator only through ta_steps per iteration)")

    def validate(self, run_config: Any = None) -> None:
        """Value checks (ConfigError naming the key); with the run config, what DIDR cannot run with."""
        def need(ok: bool, key: str, what: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {what}, got {got!r}")

        need(self.reward_mode in REWARD_MODES, "didr.reward_mode", " or ".join(REWARD_MODES), self.reward_mode)
        need(self.weighting in WEIGHTINGS, "didr.weighting", " or ".join(WEIGHTINGS), self.weighting)
        need(self.one_step in ONE_STEP, "didr.one_step", " or ".join(ONE_STEP), self.one_step)
        need(0.0 < self.sigma_min < self.sigma_max <= 1.0, "didr.sigma_min/sigma_max",
             "0 < sigma_min < sigma_max <= 1", (self.sigma_min, self.sigma_max))
        need(self.beta > 0, "didr.beta", "> 0", self.beta)
        need(self.cfg_scale > 0, "didr.cfg_scale", "> 0", self.cfg_scale)
        need(self.drp_steps >= 1, "didr.drp_steps", ">= 1", self.drp_steps)
        need(self.ta_steps >= 1, "didr.ta_steps", ">= 1", self.ta_steps)
        need(self.weight_floor > 0, "didr.weight_floor", "> 0", self.weight_floor)
        need(self.ta_lr >= 0, "didr.ta_lr", ">= 0", self.ta_lr)
        need(self.init_regression_steps >= 0, "didr.init_regression_steps", ">= 0", self.init_regression_steps)
        need(self.init_pairs >= 1, "didr.init_pairs", ">= 1", self.init_pairs)
        need(self.init_ode_steps >= 1, "didr.init_ode_steps", ">= 1", self.init_ode_steps)
        need(self.init_batch_size >= 1, "didr.init_batch_size", ">= 1", self.init_batch_size)
        need(self.init_lr >= 0, "didr.init_lr", ">= 0", self.init_lr)
        need(self.init_ta_steps >= 0, "didr.init_ta_steps", ">= 0", self.init_ta_steps)
        if run_config is not None:
            need(run_config.deepspeed.zero_stage == 0, "deepspeed.zero_stage", "0 for DIDR (its generator and "
                 "fake score train with two optimizers of their own; ZeRO sharding of them is not wired)",
                 run_config.deepspeed.zero_stage)


# ---------------------------------------------------------------------------------------------------------------
# The math, as plain functions (each one a line of the spec)
# ---------------------------------------------------------------------------------------------------------------

def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in an accumulation dtype of at least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] sigma -> [B, 1, 1, ...] in x's dtype, to broadcast against x."""
    return sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Score ``s = -eps_hat / sigma``, ``eps_hat = x + (1 - sigma) v`` (sigma [B], kept away from 0 by callers)."""
    s = _bcast(sigma, x)
    return -(x + (1 - s) * v) / s


def denoise_k(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor,
              sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """Phi_K: ``steps`` deterministic Euler steps from sigma to 0 on the uniform grid sigma * (1 - k/K).

    Differentiable w.r.t. ``x_t`` (no detach inside); K = 1 is the Tweedie jump ``x0_hat = x_t - sigma v``.
    """
    x = x_t
    for k in range(steps):
        s_now = sigma * (1 - k / steps)
        s_next = sigma * (1 - (k + 1) / steps)
        x = x + _bcast(s_next - s_now, x) * velocity_fn(x, s_now)
    return x


def diffused_reward_proxy(x_t: torch.Tensor, sigma: torch.Tensor, reward_of_x0: Callable[[torch.Tensor], torch.Tensor],
                          velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, steps: int,
                          beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DRP ``s_r_hat = (1/beta) grad_{x_t} r(Phi_K(x_t))`` on its own autograd graph, returned detached.

    ``reward_of_x0`` maps latents x0 [B, ...] to per-sample rewards [B] (decode + differentiable reward).
    Returns ``(s_r_hat, r)`` with ``r`` the detached reward of the denoised estimate (for logging).
    Only ``x_t`` is differentiated (``autograd.grad`` with ``inputs``): no parameter gradient is accumulated.
    """
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        r = reward_of_x0(denoise_k(velocity_fn, x_in, sigma, steps))
        (grad,) = torch.autograd.grad(r.sum(), x_in)
    return (grad / beta).detach(), r.detach()


def dmd_weight(x0: torch.Tensor, x0_hat_ref: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """Per-sample weight ``1 / sg(max(mean_pix |x0 - x0_hat_ref|, floor))``, fp32 [B]."""
    dims = tuple(range(1, x0.ndim))
    return 1.0 / (_acc(x0.detach()) - _acc(x0_hat_ref.detach())).abs().mean(dims).clamp_min(floor)


def x0_space_factor(sigma: torch.Tensor) -> torch.Tensor:
    """``sigma^2 / (1 - sigma)``: a score difference at sigma times this is the x0-prediction difference
    (``x0_hat = (x + sigma^2 s) / (1 - sigma)``); fp32 [B] (1 - sigma floored at 1e-4)."""
    s = _acc(sigma)
    return s * s / (1 - s).clamp_min(1e-4)


def generator_surrogate(x_t: torch.Tensor, direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mean_i w_i * sum_pix(sg(direction_i) * x_t_i)``: its gradient is ``w (d - s_r) dx_t/dtheta`` per sample."""
    dims = tuple(range(1, x_t.ndim))
    return (weight * (_acc(direction.detach()) * _acc(x_t)).sum(dims)).mean()


def regression_loss(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generator initialisation / DMD regression: ``mean_i mean_pix (g(z_i) - x_ref_i)^2`` against reference samples
    ``x_ref`` made from the same noise ``z`` (no gradient into the target)."""
    return (_acc(x0) - _acc(target.detach())).pow(2).mean()


def ta_flow_matching_loss(v_fake: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Fake-score (TA) loss: ``mean_i mean_pix (v_psi - (eps - x0))^2`` with x0 from the (stopped) generator."""
    return (_acc(v_fake) - (_acc(eps) - _acc(x0.detach()))).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Validation of what DIDR can be combined with
# ---------------------------------------------------------------------------------------------------------------

def check_generator(generator: Any) -> None:
    """DIDR needs a one-step generator exposing ``generate(z, cond)`` and ``velocity(x, sigma, cond, adapter=...)``."""
    if not (callable(getattr(generator, "generate", None)) and callable(getattr(generator, "velocity", None))):
        raise ConfigError(
            f"DIDR needs a one-step generator (models/onestep.py: UNetOneStep, or FlowOneStep via didr.one_step=flow), "
            f"but {type(generator).__name__} is a multi-step model without generate(z, cond)")


def check_reward(reward: Any) -> None:
    """DIDR needs a differentiable reward (``differentiable = True`` and ``score_differentiable``)."""
    if getattr(reward, "differentiable", False) and callable(getattr(reward, "score_differentiable", None)):
        return
    parts = getattr(reward, "components", None)
    if parts is not None:  # a RewardSet: name the offending components
        names = [c.key for c in parts if c.weight != 0 and not getattr(c.reward, "differentiable", False)]
    else:
        names = [getattr(reward, "name", type(reward).__name__)]
    raise ConfigError(
        f"DIDR needs a differentiable reward (its gradient drives the Diffused Reward Proxy), but {names} "
        f"{'is' if len(names) == 1 else 'are'} not differentiable: use e.g. testbed_classifier, pickscore, clip_score, "
        f"hps or aesthetic (or FDFO/CRD, which take any reward)")


# ---------------------------------------------------------------------------------------------------------------
# Parameters of the two trained networks (each gets its own optimizer: engine.stepper.TorchStepper)
# ---------------------------------------------------------------------------------------------------------------

def adapter_params(model: Any, name: str) -> list[torch.nn.Parameter]:
    """Trainable parameters of adapter ``name`` through the adapter protocol (``model.adapters.params``)."""
    adapters = getattr(model, "adapters", None)
    if adapters is None or name not in getattr(adapters, "names", ()):
        raise ValueError(f"DIDR: the model has no {name!r} adapter (models/lora.py adapters with names including "
                         f"'policy' and 'fake' are required)")
    return [p for p in adapters.params(name).values() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------

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
        return _acc(self.reward.score_differentiable(images, prompts, metadata))

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
        x = _acc(z)
        sigmas = self.teacher.sigmas(steps).to(z.device, torch.float32)
        for i in range(sigmas.numel() - 1):
            sig = sigmas[i].expand(x.shape[0])
            x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * _acc(self.ref_velocity(x, sig, cond))
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
        x_t = (1 - _bcast(sigma, x0)) * x0 + _bcast(sigma, x0) * eps
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
        x_t = (1 - _bcast(sigma, x0)) * x0 + _bcast(sigma, x0) * eps
        x_t_sg = x_t.detach()
        with torch.no_grad():
            v_ref = self.ref_velocity(x_t_sg, sigma, cond)
            v_fake = self.fake_velocity(x_t_sg, sigma, cond)
            d = (score_from_velocity(_acc(x_t_sg), _acc(v_fake), sigma)
                 - score_from_velocity(_acc(x_t_sg), _acc(v_ref), sigma))
            x0_hat_ref = x_t_sg - _bcast(sigma, x_t_sg) * v_ref
            if cfg.weighting in ("dmd", "dmd_x0"):
                w = dmd_weight(x0, x0_hat_ref, cfg.weight_floor)
                if cfg.weighting == "dmd_x0":
                    w = w * x0_space_factor(sigma.to(w.device, w.dtype))
            else:
                w = torch.ones(b, device=x0.device, dtype=d.dtype)
        dims = tuple(range(1, x0.ndim))
        stats = {"w": w, "d_rms": d.pow(2).mean(dims).sqrt()}
        if cfg.reward_mode == "diffused":
            s_r, r_drp = diffused_reward_proxy(
                x_t_sg, sigma, lambda x: self.reward_of_x0(x, prompts, metadata),
                lambda x, s: self.ref_velocity(x, s, cond, cfg=cfg.drp_cfg), steps=cfg.drp_steps, beta=cfg.beta)
            loss = generator_surrogate(x_t, d - s_r, w)
            with torch.no_grad():  # the reward of the generator's own samples (monitoring only)
                r_x0 = self.reward_of_x0(x0.detach(), prompts, metadata)
            stats.update(reward=r_x0, reward_drp=r_drp, drp_rms=s_r.pow(2).mean(dims).sqrt())
        else:  # DI++: the integral-KL surrogate plus the terminal reward through the generator
            r = self.reward_of_x0(x0, prompts, metadata)
            loss = generator_surrogate(x_t, d, w) - cfg.alpha * r.mean()
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


# ---------------------------------------------------------------------------------------------------------------
# The engine method
# ---------------------------------------------------------------------------------------------------------------

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
        self._warm_done = False
        self._pairs: tuple[torch.Tensor, Cond, torch.Tensor | None] | None = None  # this rank's warm-start pairs

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

    # -- regression initialisation (didr.init_*) ---------------------------------------------------------------
    def _regression_pairs(self, ctx, core: DIDR) -> tuple[torch.Tensor, Cond, torch.Tensor | None]:
        """This rank's share (pairs rank, rank + world, ...) of ``init_pairs`` (noise z, reference ODE sample from z,
        None without regression steps) on the training prompts (seeded permutations, so every prompt is used about
        equally), made once per warm start."""
        if self._pairs is None:
            from engine.rollout import sample_noise

            o, cfg, dist = self.opt, ctx.cfg, ctx.dist
            n, p = o.init_pairs, len(ctx.prompts)
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.cat([torch.randperm(p, generator=g) for _ in range(-(-n // p))])[:n]
            idx = torch.arange(dist.rank, n, dist.world_size)
            prompts, _ = ctx.prompts.select(order[idx].tolist())
            shape = ctx.model.latent_shape(cfg.model.resolution, cfg.model.resolution)
            z = sample_noise(idx, shape, seed=cfg.seed, epoch=DIDR_INIT_EPOCH, stream=Stream.DIDR_INIT,
                             device=dist.device)
            cond = core.generator.encode(prompts).to(dist.device)
            bs = max(1, cfg.rollout.batch_size)
            x = None  # the ODE targets only when the regression runs (the fake-score warm-up needs z and c only)
            if o.init_regression_steps:
                x = torch.cat([core.reference_sample(z[a:a + bs], cond.index(slice(a, a + bs)), o.init_ode_steps)
                               for a in range(0, z.shape[0], bs)]) if z.shape[0] else z.float()
            self._pairs = (z, cond, x)
        return self._pairs

    def _pair_batch(self, ctx, core: DIDR, gen: torch.Generator) -> tuple[torch.Tensor, Cond, torch.Tensor | None]:
        """A random batch of this rank's pairs (``init_batch_size`` over all ranks)."""
        z, cond, x = self._regression_pairs(ctx, core)
        k = -(-self.opt.init_batch_size // ctx.dist.world_size)
        sel = torch.randint(z.shape[0], (k,), generator=gen)
        return z[sel], cond.index(sel.to(z.device)), None if x is None else x[sel]

    def _warm_start(self, ctx, core: DIDR) -> None:
        """The initialisation of a fresh run (a resumed run has it in its weights), once, before the first DIDR
        iteration: ``init_regression_steps`` AdamW steps (own optimizer, ``init_lr``) of the regression loss, then
        ``init_ta_steps`` updates of the fake score (the TA optimizer) on the initialised generator's samples.
        Logs one ``didr_init`` record."""
        import time

        if self._warm_done:
            return
        self._warm_done = True
        o, t, dist = self.opt, ctx.cfg.train, ctx.dist
        if (o.init_regression_steps == 0 and o.init_ta_steps == 0) or ctx.global_step > 0:
            return
        t0 = time.time()
        self._regression_pairs(ctx, core)
        record = {"init/pairs": o.init_pairs, "init/steps": o.init_regression_steps,
                  "init/ta_steps": o.init_ta_steps, "init/pairs_s": time.time() - t0}
        gen = torch.Generator().manual_seed(ctx.cfg.seed * 65537 + dist.rank)
        mb = max(1, ctx.layout.micro_batch_size)
        stepper = TorchStepper(adapter_params(core.generator, "policy"), lr=o.init_lr or t.lr,
                               weight_decay=t.weight_decay, betas=t.betas, grad_clip=t.grad_clip,
                               average_over=dist if dist.world_size > 1 else None)

        def loss_of(z, cond, x, sl):
            return core.regression_loss(z[sl], cond.index(sl), x[sl])[0]

        def ta_loss_of(z, cond, x, sl):  # sigma/eps drawn on the CPU generator: the same on any device
            sigma, eps = core.draw(sl.stop - sl.start, z[sl].cpu(), gen)
            return core.ta_loss(z[sl], cond.index(sl), sigma=sigma.to(z.device), eps=eps.to(z.device))[0]

        for name, steps, opt, fn in (("reg_loss", o.init_regression_steps, stepper, loss_of),
                                     ("ta_loss", o.init_ta_steps, self._opts[1], ta_loss_of)):
            losses = []
            for _ in range(steps):
                z, cond, x = self._pair_batch(ctx, core, gen)
                chunks = [slice(a, min(a + mb, z.shape[0])) for a in range(0, z.shape[0], mb)]
                total = 0.0
                for j, sl in enumerate(chunks):
                    with nvtx_range(f"train/init_{name}"):
                        loss = fn(z, cond, x, sl)
                    opt.backward(loss * ((sl.stop - sl.start) / z.shape[0]), last=j == len(chunks) - 1)
                    total = total + loss.detach() * ((sl.stop - sl.start) / z.shape[0])
                losses.append(total)
            if losses:
                losses = torch.stack(losses).float().cpu()
                tail = max(1, len(losses) // 10)
                record[f"init/{name}_first"] = float(losses[:tail].mean())
                record[f"init/{name}_last"] = float(losses[-tail:].mean())
        self._pairs = None  # used once: the noises, prompt embeddings and targets need not stay on the device
        record["init/seconds"] = time.time() - t0
        ctx.logger.log(0, record, kind="didr_init")

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
        from engine.methods.common import step_slices

        core = self._setup(ctx)
        self._warm_start(ctx, core)
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
