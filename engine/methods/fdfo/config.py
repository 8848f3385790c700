"""FDFO's options (YAML section ``fdfo``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import ConfigError
from engine.options import opt

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class FDFOConfig:
    """FDFO options (YAML section ``fdfo``); every option has a working default (the paper's 40-step recipe).

    Optimizer settings are the engine's ``train.*`` keys (FDFO recipes: lr 3e-5, wd 1e-4, clip 1.0,
    gradient_steps_per_epoch 4); ``data.group_size`` must be 2 (one pair per prompt).
    """

    num_steps: int = opt(40, "N: churned-Euler pair-sampler steps (10 = fast preset)")
    gamma: float = opt(0.0025, "churn g at every level (0 on the last step)")
    gamma_schedule: list = opt([], "per-step churn table (num_steps values) overriding gamma; [] = constant gamma")
    prior_gamma: float = opt(-1.0, "prior churn g0 on the shared initial noise; < 0 = the first step's churn")
    cfg_scale: float = opt(1.0, "CFG scale of sampling AND training (1 = no CFG)")
    storage_dtype: str = opt("fp32", "stored states/velocities: fp32 | bf16 (ratio exactly 1 needs the model's own "
                                     "dtype)")
    clip: float = opt(0.03, "eps_clip of the SPO surrogate")
    kl_lambda: float = opt(0.0, "lam of lam * mean_pix (v - v_pre)^2 (0 = off)")
    micro_batch_items: int = opt(16, "items (branch, step) per rank per micro-step")

    def validate(self, run_config: Any = None) -> None:
        """Value checks (ConfigError naming the key); with the run config, the batch layout FDFO needs."""
        def need(ok: bool, key: str, what: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {what}, got {got!r}")

        need(self.num_steps >= 1, "fdfo.num_steps", ">= 1", self.num_steps)
        need(self.gamma >= 0, "fdfo.gamma", ">= 0", self.gamma)
        need(not self.gamma_schedule or len(self.gamma_schedule) == self.num_steps, "fdfo.gamma_schedule",
             f"empty or a list of num_steps = {self.num_steps} values", self.gamma_schedule)
        need(all(isinstance(g, (int, float)) and g >= 0 for g in self.gamma_schedule), "fdfo.gamma_schedule",
             "a list of numbers >= 0", self.gamma_schedule)
        need(self.storage_dtype in STORAGE_DTYPES, "fdfo.storage_dtype", "fp32 or bf16", self.storage_dtype)
        need(self.clip > 0, "fdfo.clip", "> 0", self.clip)
        need(self.kl_lambda >= 0, "fdfo.kl_lambda", ">= 0", self.kl_lambda)
        need(self.cfg_scale > 0, "fdfo.cfg_scale", "> 0", self.cfg_scale)
        need(self.micro_batch_items >= 1, "fdfo.micro_batch_items", ">= 1", self.micro_batch_items)
        if run_config is not None:
            need(run_config.data.group_size == 2, "data.group_size", "2 for FDFO (one pair of trajectories per "
                 "prompt)", run_config.data.group_size)
            need(run_config.train.micro_batch_size % 2 == 0, "train.micro_batch_size",
                 "even for FDFO (both branches of a pair on one rank)", run_config.train.micro_batch_size)

    def gammas(self) -> float | torch.Tensor:
        """The churn handed to the sampler: a float or a per-step table."""
        if self.gamma_schedule:
            return torch.tensor([float(g) for g in self.gamma_schedule], dtype=torch.float64)
        return float(self.gamma)
