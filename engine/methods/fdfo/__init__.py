"""FDFO: Finite Difference Flow Optimization (spec/methods.md section 4).

The whole sampling run is one action. Per prompt, one pair of trajectories (rows ``2p``, ``2p + 1``):

1. rollout: the churned-Euler pair sampler (``models.samplers.sample_fdfo_pairs``: shared initial noise, fresh churn
   per branch) with the current policy, storing per branch the states where v was evaluated, the velocities used
   (``v_ref``) and x_T, in ``fdfo.storage_dtype``; CFG optional (training then uses the same CFG);
2. rewards on both branches, raw units (no group normalisation);
3. ``kernels.fdfo_pairs(x_T, R) -> (dR, dxh)``, one row per branch;
4. items (branch, step) of ALL ranks are shuffled with a permutation seeded by (seed, epoch) and split into
   ``gradient_steps_per_epoch`` optimizer steps; each rank trains on the items of its own branches;
5. ``kernels.fdfo_loss(v_theta, v_ref, dxh, dR, item_index=...)`` (SPO surrogate; ``dxh``/``dR`` stay one row per
   branch and items index into them: no per-step copy) plus the optional KL ``lam * mean_pix (v_theta - v_pre)^2``;
   AdamW (lr 3e-5, wd 1e-4, clip 1.0 in the recipes), no EMA: the rollout uses the policy itself, so the ratio is
   exactly 1 on the first micro-step of every epoch (logged as ``ratio_first_dev``).

W-process == 1-process: every optimizer step's loss is ``(1/M) sum`` over the step's M global items. A rank
back-propagates ``(W/M) sum`` over the items it owns, so the ranks' mean gradient (what DeepSpeed all-reduces) is the
1-process gradient. Ranks own different numbers of a step's items; they pad to the same number of micro-batches
(known on every rank from the shared permutation, no communication) with zero-weight items, so collective-bearing
forwards (ZeRO-3) stay in lockstep. Initial and churn noise are drawn per GLOBAL sample (``engine.rollout``), so the
rollouts do not depend on the world size either.

Package layout: ``config`` (options), ``rollout`` (the paired sampler run), ``update`` (item schedule, SPO steps),
``method`` (the engine method, registered as ``fdfo``).
"""
from engine.methods.fdfo.config import STORAGE_DTYPES, FDFOConfig
from engine.methods.fdfo.method import FDFOMethod, FDFOTargets
from engine.methods.fdfo.rollout import PairData, paired_rollout, velocity_for
from engine.methods.fdfo.update import ItemSchedule, contiguous_rank_rows, fdfo_update, item_schedule, spo_per_item

__all__ = ["FDFOConfig", "FDFOMethod", "FDFOTargets", "ItemSchedule", "PairData", "STORAGE_DTYPES",
           "contiguous_rank_rows", "fdfo_update", "item_schedule", "paired_rollout", "spo_per_item", "velocity_for"]
