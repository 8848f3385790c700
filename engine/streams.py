"""Every random stream of the engine in one place.

Each per-sample draw is seeded by ``(seed, epoch, stream, global sample index)`` (``engine.rollout.sample_noise`` /
``sample_subsets``), so any world size draws the same numbers and no two purposes share one. A new draw gets a new
member here, never a reused number (that would correlate two draws and change recorded runs).
"""
from enum import IntEnum


class Stream(IntEnum):
    INIT_NOISE = 0    # the rollout's initial noise (also evaluation and FDFO's shared pair noise, DIDR's z)
    TIMESTEPS = 1     # CRD/NFT: which K training sigmas each sample trains on (table entries or continuous)
    TRAIN_NOISE = 2   # CRD/NFT: the fresh eps of each (sample, training timestep)
    FDFO_CHURN = 3    # FDFO: the per-branch churn noise of the pair sampler
    DIDR_SIGMA = 4    # DIDR: diffusion times of the TA and generator steps
    DIDR_EPS = 5      # DIDR: their noise
    DIDR_INIT = 6     # DIDR: the warm start's (noise, reference sample) pairs
    TIMESTEPS_GROUP = 7        # CRD/NFT train.timestep_sharing=group: one draw of K sigmas per prompt group (by id)
    TIMESTEPS_MICRO_BATCH = 8  # ... =micro_batch: one draw per global micro-batch (by its number in the epoch)
    GRPO_SDE_NOISE = 9         # GRPO: the per-step SDE noise of each sample's rollout
    GRPO_WINDOW = 10           # GRPO-Fast: where each sample's SDE window starts


#: "epochs" of draws made outside the epoch loop (far above any run's epoch count)
LOOP_EVAL_EPOCH = 0xFFFF      # engine.loop.evaluate: the same held-out noise at every evaluation
TESTBED_EVAL_EPOCH = 0xEEEE   # engine.testbed.eval: paired before/after comparisons
DIDR_INIT_EPOCH = 0xD1D0      # DIDR's warm-start pairs (drawn once per run)
