"""Flow-GRPO: the trajectory-based baseline (spec/methods.md section 7; arXiv 2505.05470, official trainer
yifan123/flow_grpo).

The flow ODE becomes an SDE; each solver step is a Gaussian policy action. Per epoch:

1. rollout: P prompts x G samples with the policy itself, ``rollout.num_steps`` (N) steps of the model's schedule,
   CFG ``cfg_scale`` (4.5; 1 = the ``nocfg`` presets). Step sigma -> sigma_next (``dt < 0``), noise level
   ``a = noise_level`` (0.7), all scheduler arithmetic in fp32 (``kernels.reference.grpo_coefficients``):
   ``sde``: ``std_dev = sqrt(sigma / (1 - sigma)) a`` (at sigma = 1 the table's second entry in the denominator),
   ``mean = x (1 + std_dev^2 / (2 sigma) dt) + v (1 + std_dev^2 (1 - sigma) / (2 sigma)) dt`` (affine in v),
   ``x_next = mean + std_dev sqrt(-dt) xi``, ``log p`` the Gaussian log-density averaged over the latent's elements,
   constants included; ``cps``: ``std_dev = sigma_next sin(pi a / 2)``, ``mean = x0_hat (1 - sigma_next) + eps_hat
   sqrt(sigma_next^2 - std_dev^2)``, ``log p = -mean_pix (x_next - mean)^2``. Initial noise and every step's xi are
   drawn per GLOBAL sample (``Stream.INIT_NOISE``, ``Stream.GRPO_SDE_NOISE``). Stored per row: the states and
   log-probs of the K trained steps (``rollout.Trajectories``).
2. rewards -> per-prompt advantages over all ranks: ``A = (R - mean_g R) / (std + 1e-4)``, std population over the
   epoch (``global_std``) or the group, clipped at ``adv_clip`` (5); groups with a failed reward leave the update.
3. K = ``int(N * train.timestep_fraction)`` (0.99: the first 9 of 10 steps) trained steps per sample, in order.
   Flow-GRPO-Fast (``window_size`` W > 0): SDE only on steps ``start .. start + W - 1`` with ``start`` uniform in
   ``lo .. hi - W`` (``window_range``, default ``[0, N // 2]``; drawn per sample, ``Stream.GRPO_WINDOW``), the Euler
   ODE elsewhere, K = W, only the window trained (official presets: W = 3 in steps 0-4, noise 0.8, clip 1e-5,
   ``cps``, no KL, no CFG).
4. per optimizer step, per micro-batch, per trained step (one micro-step each):
   ``v = v_theta(x_t)`` with the rollout's CFG (no gradient through the unconditional branch, ``detach_uncond``),
   ``lp`` its log-prob of the stored ``x_next``, ``ratio = exp(lp - lp_old)``,
   ``L = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` (``clip_range`` eps = 1e-4) plus
   ``kl_beta mean_pix (mean - mean_ref)^2 / (2 std_dev^2)`` with ``mean_ref`` from the pretrained model's velocity
   (same CFG; ``kl_beta`` 0.04, 0 skips the reference pass); ``kernels.grpo_loss`` (fused: one read of
   ``v, v_ref, x_t, x_next`` forward, one backward, ``dL/dv`` analytic). Each micro-step's loss is scaled by
   ``1 / (a K)``; optimizer AdamW (``train.*``).
5. logged once per optimizer step: ``policy_loss``, ``kl_loss``, ``ratio``, ``approx_kl = (lp - lp_old)^2 / 2``,
   ``clipfrac`` (``|ratio - 1| > eps``), ``clipfrac_gt_one``, ``clipfrac_lt_one``, ``ratio_first_dev``; per epoch
   ``zero_std_fraction``.

On-policy ratio exactly 1: the rollout samples in the training micro-batches' row chunks with the same velocity
rule (``rollout.velocity_for``) and stores ``lp_old`` from ``kernels.grpo_logprob``, the loss's own sums (launch
geometry independent of the row count), so the first micro-step recomputes bit-identical log-probs.

Where the engine differs from the official trainer (named, measured where it matters): no EMA for evaluation
(``eval.adapter: policy``); samples are not reshuffled before training (the layout's micro-batches of whole groups;
prompts are drawn at random anyway); samples with zero advantage stay in the batch (the official trainer drops them
and re-pads the batch; they still carry the KL term here); one window per sample instead of one per sampler call.

Package layout: ``config`` (options), ``rollout`` (the SDE sampler), ``update`` (PPO micro-steps), ``method``
(the engine method, registered as ``grpo``).
"""
from engine.methods.grpo.config import GRPOConfig
from engine.methods.grpo.method import GRPOAdvantages, GRPOMethod
from engine.methods.grpo.rollout import Trajectories, sde_mask, sde_rollout, velocity_for
from engine.methods.grpo.update import grpo_update

__all__ = ["GRPOAdvantages", "GRPOConfig", "GRPOMethod", "Trajectories", "grpo_update", "sde_mask", "sde_rollout",
           "velocity_for"]
