"""DIDR's options (YAML section ``didr``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError
from engine.options import opt

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
    reward_weight: float = opt(1.0, "scale of the reward term (diffused: the DRP s_r_hat; terminal: alpha r); 0 = "
                                    "reward off: pure distribution matching, the generator's target is the "
                                    "reference itself (the DRP is not computed; the reward is still logged)")
    cfg_scale: float = opt(4.5, "CFG scale omega of the reference (teacher) score (1 = a single pass)")
    drp_steps: int = opt(1, "K: Euler steps of the reference denoising Phi_K inside the DRP (1 = Tweedie jump)")
    drp_cfg: bool = opt(True, "use the reference's CFG inside Phi_K too (else its conditional velocity)")
    ta_steps: int = opt(1, "fake-score (TA) updates per generator update")
    sigma_min: float = opt(0.02, "diffusion times ~ U[sigma_min, sigma_max]; > 0 keeps 1/sigma finite")
    sigma_max: float = opt(0.98, "upper end of the diffusion times")
    weighting: str = opt("dmd_x0", "per-sample weight: dmd_x0 (default) = 1 / sg(mean_pix|x0 - x0_hat_ref|) times "
                                    "sigma^2 / (1 - sigma), which turns the score difference into DMD's x0-space "
                                    "difference (x0_hat_psi - x0_hat_ref) / mean_pix|x0 - x0_hat_ref| (uniform in "
                                    "sigma in the velocity units the fake score is trained in) | dmd = the spec's "
                                    "literal 1 / sg(mean_pix|x0 - x0_hat_ref|) on the score difference (its weight of "
                                    "sigma grows like 1/sigma^3: the gradient comes from the lowest sigmas, where it is "
                                    "the fake score's error amplified by (1 - sigma) / sigma; issue 17: it neither "
                                    "holds p_ref nor reaches p* on the exact Gaussian-mixture world) | none")
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
        need(self.reward_weight >= 0, "didr.reward_weight", ">= 0", self.reward_weight)
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
