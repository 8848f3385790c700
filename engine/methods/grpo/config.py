"""Flow-GRPO's options (YAML section ``grpo``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.batch import eligible_timesteps
from engine.errors import ConfigError
from engine.options import opt
from kernels.reference import GRPO_SDE_TYPES


@dataclass
class GRPOConfig:
    """Flow-GRPO options (YAML section ``grpo``); defaults are the official SD3.5-M GenEval/OCR preset
    (yifan123/flow_grpo ``config/grpo.py``: ``geneval_sd3``, ``general_ocr_sd3``).

    The sampler runs ``rollout.num_steps`` steps of the model's schedule; the optimizer is the engine's ``train.*``
    (official: lr 3e-4 LoRA, AdamW, clip 1.0, two optimizer steps per epoch).
    """

    noise_level: float = opt(0.7, "a: SDE noise level (Fast presets: 0.8)")
    sde_type: str = opt("sde", "sde (the flow SDE, log-prob with constants) | cps (coefficients-preserving "
                               "sampling, log-prob -mean (x_next - mean)^2, the Fast presets')")
    cfg_scale: float = opt(4.5, "CFG scale of sampling AND of the training forward (1 = the nocfg presets)")
    detach_uncond: bool = opt(True, "training forward with CFG: no gradient through the unconditional branch "
                                    "(official scripts/train_sd3.py)")
    clip_range: float = opt(1e-4, "eps of the PPO clip of ratio = exp(lp - lp_old) (Fast presets: 1e-5)")
    adv_clip: float = opt(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    kl_beta: float = opt(0.04, "weight of the KL to the pretrained model (0 = no reference pass; PickScore 0.01)")
    global_std: bool = opt(True, "advantage std over the whole epoch (false: per prompt group); floored std + 1e-4")
    window_size: int = opt(0, "Flow-GRPO-Fast: SDE steps in a window at a random position, ODE elsewhere, "
                              "trained only in the window (0 = SDE on every step, train on the first "
                              "int(N * train.timestep_fraction))")
    window_range: list = opt([], "[lo, hi]: the window lies inside steps lo .. hi - 1 (start drawn uniformly in "
                                 "lo .. hi - window_size); [] = [0, N // 2], the official presets'")

    def window(self, num_steps: int) -> tuple[int, int]:
        """``(lo, hi)`` of the window's range."""
        if self.window_range:
            return int(self.window_range[0]), int(self.window_range[1])
        return 0, num_steps // 2

    def train_steps(self, cfg) -> int:
        """K: trained steps per sample (the window, else ``train.num_timesteps`` or ``int(N * fraction)``)."""
        if self.window_size > 0:
            return self.window_size
        return cfg.train.num_timesteps or eligible_timesteps(cfg.rollout.num_steps, cfg.train.timestep_fraction)

    def validate(self, run_config: Any = None) -> None:
        def need(ok: bool, key: str, what: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {what}, got {got!r}")

        need(self.noise_level > 0, "grpo.noise_level", "> 0", self.noise_level)
        need(self.sde_type in GRPO_SDE_TYPES, "grpo.sde_type", "sde or cps", self.sde_type)
        need(self.cfg_scale > 0, "grpo.cfg_scale", "> 0", self.cfg_scale)
        need(self.clip_range > 0, "grpo.clip_range", "> 0", self.clip_range)
        need(self.adv_clip > 0, "grpo.adv_clip", "> 0", self.adv_clip)
        need(self.kl_beta >= 0, "grpo.kl_beta", ">= 0", self.kl_beta)
        need(self.window_size >= 0, "grpo.window_size", ">= 0", self.window_size)
        need(self.window_range == [] or (len(self.window_range) == 2 and all(isinstance(v, int)
                                                                             for v in self.window_range)),
             "grpo.window_range", "[] or [lo, hi] (two integers)", self.window_range)
        if run_config is None:
            return
        n = run_config.rollout.num_steps
        if self.window_size > 0:
            lo, hi = self.window(n)
            need(0 <= lo and hi <= n and hi - lo >= self.window_size, "grpo.window_range",
                 f"a range [lo, hi] of the {n} rollout steps holding window_size = {self.window_size} steps",
                 [lo, hi])
            need(run_config.train.num_timesteps in (0, self.window_size), "train.num_timesteps",
                 f"0 or grpo.window_size ({self.window_size}) with an SDE window (the window is what is trained)",
                 run_config.train.num_timesteps)
        if run_config.eval.adapter == "ema":
            raise ConfigError("config key 'eval.adapter' is 'ema' but GRPO keeps no eval EMA (use policy)")
