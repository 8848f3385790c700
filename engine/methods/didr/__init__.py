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
- ``reward_weight`` scales the reward term (0 = reward off: pure distribution matching to the reference).
- ``weighting="dmd_x0"`` (the default choice of ``w(sigma)``, issue 17): ``w_i`` times ``sigma^2 / (1 - sigma)``, so that ``w_i d_i`` is
  DMD's x0-space difference ``(x0_hat_psi - x0_hat_ref) / mean_pix|x0 - x0_hat_ref|`` (the plain score difference
  carries ``(1 - sigma) / sigma^2`` and lets the lowest sigmas dominate the generator gradient).
- Generator initialisation (``init_regression_steps`` > 0, DMD's regression loss used as a warm start): before the
  first iteration of a fresh run, AdamW steps of ``mean_pix (g(z, c) - x_ref(z, c))^2`` on ``init_pairs`` pairs of
  noise and the reference's own CFG Euler ODE sample from that noise. A one-step flow generator built from a
  multi-step teacher otherwise starts at the teacher's mean image ``z - v(z, 1)`` (near-blank on the testbed).

Networks: ``generator`` is a one-step generator (``models/onestep.py``: ``generate(z, cond)`` and ``velocity``);
the reference (teacher) and the fake score are adapters of the same model by default (``pretrained`` and ``fake``),
or separate models when given.

Package layout: ``config`` (options), ``math`` (the spec's lines as functions), ``core`` (:class:`DIDR`: losses and
one iteration on a one-step generator), ``warm_start`` (the generator initialisation), ``method`` (the engine
method, registered as ``didr``).
"""
from engine.methods.didr.config import DIDRConfig, ONE_STEP, REWARD_MODES, WEIGHTINGS
from engine.methods.didr.core import DIDR
from engine.methods.didr.math import (adapter_params, check_generator, check_reward, denoise_k, diffused_reward_proxy,
                                      dmd_weight, generator_surrogate, regression_loss, score_from_velocity,
                                      ta_flow_matching_loss, x0_space_factor)
from engine.methods.didr.method import DIDRMethod
from engine.methods.didr.warm_start import WarmStart

__all__ = ["DIDR", "DIDRConfig", "DIDRMethod", "ONE_STEP", "REWARD_MODES", "WEIGHTINGS", "WarmStart", "adapter_params",
           "check_generator", "check_reward", "denoise_k", "diffused_reward_proxy", "dmd_weight",
           "generator_surrogate", "regression_loss", "score_from_velocity", "ta_flow_matching_loss",
           "x0_space_factor"]
