"""The official DiffusionNFT trainer's std floor and timestep choice, and the training-timestep draw options.

- ``std_floor``: ``max`` divides the centered rewards by ``max(std, 1e-6)`` (CRD, the old behaviour), ``additive``
  by ``std + 1e-4``, as the official DiffusionNFT trainer does (NVlabs/DiffusionNFT ``flow_grpo/stat_tracking.py``
  lines 26-31: per-prompt mean, ``np.std`` of all rewards (global, line 28) or of the prompt's (line 30), plus
  1e-4, then ``(rewards - mean) / std`` at line 31);
- ``timestep_choice``: ``fraction`` (K distinct of the ``int(N * fraction)`` noisiest table sigmas, the old draw) or
  ``official`` (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``: each sample stores all N scheduler timesteps,
  line 662; one ``torch.randperm(N)`` per sample shuffles them, lines 810-816; the first
  ``int(N * timestep_fraction)`` columns are trained, lines 569 and 854-864: K distinct of ALL N, per sample);
- ``train.timestep_sharing`` (sample | group | micro_batch) and ``train.timestep_sampling``
  (discrete | uniform | logit_normal).
NFT defaults to ``additive`` + ``official``; CRD keeps ``max`` + ``fraction``; the defaults of the ``train`` options
are the old draw bit for bit.
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kernels
from engine.batch import derive_batch
from engine.errors import ConfigError
from engine.methods import common
from engine.methods.crd import CRD, CRDConfig
from engine.methods.nft import NFT, NFTConfig
from engine.streams import Stream
from models.samplers import linear_sigmas
from tests.light_context import light_context, run_config

N_STEPS = 10


# ------------------------------------------------------------------------------------------------ the std floor
def _official_advantages(rewards: np.ndarray, prompts: np.ndarray, global_std: bool) -> np.ndarray:
    """The official per-prompt normalisation written out (stat_tracking.py lines 26-31): per prompt
    ``(R - mean_prompt) / (std + 1e-4)``, std (ddof 0) of all rewards or of the prompt's."""
    out = np.zeros_like(rewards)
    for p in np.unique(prompts):
        sel = prompts == p
        spread = np.std(rewards) if global_std else np.std(rewards[sel])
        out[sel] = (rewards[sel] - rewards[sel].mean()) / (spread + 1e-4)
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_additive_floor_equals_the_hand_computation_and_the_official_formula(global_std):
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(24, generator=g, dtype=torch.float64) * 0.02  # small spread: the floor matters
    ids = torch.arange(6).repeat_interleave(4)
    adv, r01, stats = kernels.group_advantages(rewards, ids, global_std=global_std, adv_clip=50.0,
                                               std_floor="additive")
    # by hand, in fp64
    R = rewards.numpy()
    mean_g = np.repeat(R.reshape(6, 4).mean(1), 4)
    std = np.full(24, R.std()) if global_std else np.repeat(R.reshape(6, 4).std(1), 4)
    hand = (R - mean_g) / (std + 1e-4)
    np.testing.assert_allclose(adv.numpy(), hand, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(adv.numpy(), _official_advantages(R, ids.numpy(), global_std), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(r01.numpy(), np.clip(0.5 + np.clip(hand, -50, 50) / 100, 0, 1), rtol=1e-12)
    # the old floor divides by max(std, 1e-6) = std here: different numbers, same shape
    adv_max, _, _ = kernels.group_advantages(rewards, ids, global_std=global_std, adv_clip=50.0)
    np.testing.assert_allclose(adv_max.numpy(), (R - mean_g) / np.maximum(std, 1e-6), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(adv, adv_max)
    # the divisor helper is what divides
    torch.testing.assert_close(kernels.reference.floored_std(stats["std"], "additive"),
                               torch.from_numpy(std + 1e-4), rtol=1e-15, atol=0)


def test_additive_floor_fp32_and_zero_spread():
    rewards = torch.tensor([0.0, 1e-5, 0.5, 0.5, 0.25, 0.75, 0.0, 1e-7])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    adv, _, stats = kernels.group_advantages(rewards, ids, global_std=False, std_floor="additive")
    adv_max, _, _ = kernels.group_advantages(rewards, ids, global_std=False)
    h0, h3 = float(rewards[1]) / 2, float(rewards[7]) / 2  # each pair's half spread = its population std
    # group 0 (std 5e-6): additive 5e-6 / (5e-6 + 1e-4), max: +-1
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0]) * h0 / (h0 + 1e-4))
    torch.testing.assert_close(adv_max[:2], torch.tensor([-1.0, 1.0]))
    # group 1: all equal -> 0 exactly with either floor
    assert adv[2:4].tolist() == [0.0, 0.0] and adv_max[2:4].tolist() == [0.0, 0.0]
    torch.testing.assert_close(adv[4:6], torch.tensor([-0.25, 0.25]) / 0.2501)
    # group 3 (std 5e-8 < 1e-6): both floors bind, differently: 5e-8 / 1.0005e-4 vs 5e-8 / 1e-6
    torch.testing.assert_close(adv[6:], torch.tensor([-1.0, 1.0]) * h3 / (h3 + 1e-4))
    torch.testing.assert_close(adv_max[6:], torch.tensor([-1.0, 1.0]) * h3 / 1e-6)
    assert stats["zero_std_fraction"].item() == pytest.approx(1 / 4)


def test_std_floor_bad_name_is_one_value_error_sentence():
    with pytest.raises(ValueError, match=r"^group_advantages: `std_floor` must be one of \('max', 'additive'\), "
                                         r"got 'min'\.$"):
        kernels.group_advantages(torch.rand(4), torch.tensor([0, 0, 1, 1]), std_floor="min")
    assert kernels.reference.STD_FLOORS == ("max", "additive")


@pytest.mark.parametrize("override,needle", [
    ("nft.std_floor=min", "nft.std_floor"), ("nft.timestep_choice=all", "nft.timestep_choice"),
    ("train.timestep_sharing=rank", "train.timestep_sharing"),
    ("train.timestep_sampling=normal", "train.timestep_sampling"),
    ("train.logit_normal=[0.0, -1.0]", "train.logit_normal"),
])
def test_bad_option_values_are_one_config_error_sentence(override, needle):
    from engine.config import load_config
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override], method="nft")


def test_option_defaults():
    assert NFTConfig().std_floor == "additive" and NFTConfig().timestep_choice == "official"
    assert not hasattr(CRDConfig(), "std_floor") and not hasattr(CRDConfig(), "timestep_choice")
    from engine.config import TrainConfig
    t = TrainConfig()
    assert (t.timestep_sharing, t.timestep_sampling, t.logit_normal) == ("sample", "discrete", [0.0, 1.0])


# ------------------------------------------------------------------------------------------------ the draws
class _Sigmas:
    """Stands in for the model: only ``sigmas`` is read by ``draw_points`` (a shifted flow-matching table)."""

    def sigmas(self, n):
        return linear_sigmas(n, shift=3.0)


def _ctx(method: str = "crd", *, world_size=1, rank=0, prompts=8, group=4, micro=4, steps=2, K=3, seed=0,
         epoch=0, **train):
    m = CRD(run_config("crd", CRDConfig())) if method == "crd" else NFT(run_config("nft", NFTConfig()))
    ctx = light_context(m, _Sigmas(), None, prompts_per_epoch=prompts, group_size=group, micro_batch_size=micro,
                        gradient_steps=steps, world_size=world_size, rank=rank, seed=seed, epoch=epoch)
    ctx.cfg.rollout.num_steps = N_STEPS
    for k, v in train.items():
        setattr(ctx.cfg.train, k, v)
    ctx.layout = derive_batch(world_size, prompts, group, micro, steps, K, exact_groups=m.exact_groups)
    idx = ctx.layout.rank_indices(rank)
    ro = SimpleNamespace(epoch=epoch, global_idx=idx, group_ids=idx // group, x0=torch.zeros(len(idx), 1, 2, 2))
    return ctx, ro


def _old_discrete(global_idx, pool, K, seed, epoch):
    """The original draw written out: per global sample a torch generator seeded by
    SeedSequence([seed, epoch, Stream.TIMESTEPS, index]) >> 1, ``randperm(pool)[:K]``."""
    gen, rows = torch.Generator(), []
    for i in global_idx.tolist():
        gen.manual_seed(int(np.random.SeedSequence([seed, epoch, int(Stream.TIMESTEPS), i])
                            .generate_state(1, np.uint64)[0] >> 1))
        rows.append(torch.randperm(pool, generator=gen)[:K])
    return torch.stack(rows)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_crd_defaults_are_the_old_draw_bit_for_bit(rank, world_size):
    ctx, ro = _ctx("crd", world_size=world_size, rank=rank, micro=8 // world_size, seed=5, epoch=3)
    pts = common.draw_points(ctx, ro)
    table = linear_sigmas(N_STEPS, shift=3.0)
    want = table[_old_discrete(ro.global_idx, int(N_STEPS * 0.99), 3, 5, 3)]
    assert pts.sigma.dtype == torch.float32 and torch.equal(pts.sigma, want)
    assert not (pts.sigma == table[N_STEPS - 1]).any()  # fraction: the cleanest nonzero sigma is never drawn


def test_nft_default_choice_is_official_k_of_all_n():
    ctx, ro = _ctx("nft", prompts=16, K=9, seed=1, epoch=2)
    pts = common.draw_points(ctx, ro)
    table = linear_sigmas(N_STEPS, shift=3.0)
    picks = _old_discrete(ro.global_idx, N_STEPS, 9, 1, 2)  # randperm over ALL N, first K = int(N * 0.99) = 9
    assert torch.equal(pts.sigma, table[picks])
    # per sample: 9 distinct table entries, one random step left out, the cleanest one included in most rows
    assert all(len(set(row.tolist())) == 9 for row in pts.sigma)
    left_out = [set(range(N_STEPS)) - set(p.tolist()) for p in picks]
    assert len({next(iter(s)) for s in left_out}) > 3
    assert (pts.sigma == table[N_STEPS - 1]).any(1).float().mean() > 0.7
    assert not (pts.sigma == 0).any()
    # choice=fraction on the NFT context is the old draw again
    assert torch.equal(common.draw_points(ctx, ro, choice="fraction").sigma,
                       table[_old_discrete(ro.global_idx, 9, 9, 1, 2)])


def _sigma_by_global(method="crd", world_size=1, **kw):
    """global sample index -> its K sigmas, over every rank of ``world_size``."""
    out = {}
    for rank in range(world_size):
        ctx, ro = _ctx(method, world_size=world_size, rank=rank, **kw)
        pts = common.draw_points(ctx, ro)
        for i, s in zip(ro.global_idx.tolist(), pts.sigma):
            out[i] = s
    return out


@pytest.mark.parametrize("sampling", ["discrete", "uniform", "logit_normal"])
def test_group_sharing_equal_within_groups_different_across_ranks_agree(sampling):
    # G = 4, W = 2, m = 2: every group straddles the two ranks
    one = _sigma_by_global(world_size=1, micro=4, timestep_sharing="group", timestep_sampling=sampling)
    two = _sigma_by_global(world_size=2, micro=2, timestep_sharing="group", timestep_sampling=sampling)
    assert one.keys() == two.keys() == set(range(32))
    for i in one:
        assert torch.equal(one[i], two[i])
    rows = [tuple(one[g * 4].tolist()) for g in range(8)]
    for g in range(8):
        for j in range(4):
            assert torch.equal(one[g * 4 + j], one[g * 4])
    assert len(set(rows)) == 8  # different groups draw differently
    # and differently from the per-sample draw
    per_sample = _sigma_by_global(world_size=1, micro=4, timestep_sampling=sampling)
    assert any(not torch.equal(per_sample[i], one[i]) for i in one)


@pytest.mark.parametrize("sampling", ["discrete", "uniform"])
def test_micro_batch_sharing_equal_within_a_global_micro_batch_world_size_1_vs_2(sampling):
    # P=8 x G=4 = 32 samples, global micro-batch 8 (W=1, m=8 or W=2, m=4), S=2 steps -> a=2 micro-batches per step
    one = _sigma_by_global(world_size=1, micro=8, timestep_sharing="micro_batch", timestep_sampling=sampling)
    two = _sigma_by_global(world_size=2, micro=4, timestep_sharing="micro_batch", timestep_sampling=sampling)
    for i in one:
        assert torch.equal(one[i], two[i])
    # on the emulated 2-rank layout: rank 0's and rank 1's chunks of global micro-batch b hold the same sigmas
    ctx0, ro0 = _ctx(world_size=2, rank=0, micro=4, timestep_sharing="micro_batch", timestep_sampling=sampling)
    ctx1, ro1 = _ctx(world_size=2, rank=1, micro=4, timestep_sharing="micro_batch", timestep_sampling=sampling)
    p0, p1 = common.draw_points(ctx0, ro0).sigma, common.draw_points(ctx1, ro1).sigma
    for j, sl in enumerate(s for step in common.step_slices(ctx0.layout) for s in step):
        block = torch.cat([p0[sl], p1[sl]])
        assert (block == block[0]).all(), f"global micro-batch {j}"
        assert set((ro0.global_idx[sl] // 8).tolist()) == set((ro1.global_idx[sl] // 8).tolist()) == {j}
    blocks = [tuple(one[b * 8].tolist()) for b in range(4)]
    assert len(set(blocks)) == 4
    # keyed by the epoch too
    other = _sigma_by_global(world_size=1, micro=8, epoch=1, timestep_sharing="micro_batch",
                             timestep_sampling=sampling)
    assert any(not torch.equal(one[i], other[i]) for i in one)


def _ks_distance(x: torch.Tensor, cdf, lo: float) -> float:
    """sup |F_n - F| over a sample with a possible atom at ``lo`` (both one-sided limits at every sample point)."""
    xs = torch.sort(x.double()).values
    n = xs.numel()
    uniq, counts = torch.unique_consecutive(xs, return_counts=True)
    upper = torch.cumsum(counts, 0).double() / n          # F_n(x)
    lower = upper - counts.double() / n                   # F_n(x-)
    f = cdf(uniq)
    f_left = torch.where(uniq <= lo, torch.zeros_like(f), f)  # F continuous above the atom
    return float(torch.maximum((upper - f).abs(), (lower - f_left).abs()).max())


def _ks_bound(n: int, alpha: float = 1e-3) -> float:
    """Kolmogorov's asymptotic critical value sqrt(-ln(alpha / 2) / 2) / sqrt(n)."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def _continuous(method, sampling, **kw):
    ctx, ro = _ctx(method, prompts=128, group=4, micro=8, steps=2, K=9, timestep_sampling=sampling, **kw)
    sigma = common.draw_points(ctx, ro).sigma
    table = linear_sigmas(N_STEPS, shift=3.0)
    return sigma, table


@pytest.mark.parametrize("method", ["crd", "nft"])
def test_uniform_in_range_with_the_right_moments(method):
    sigma, table = _continuous(method, "uniform")
    pool = 9 if method == "crd" else N_STEPS  # fraction: the 9 noisiest; official: all 10
    lo, hi = float(table[pool - 1]), float(table[0])
    assert sigma.dtype == torch.float32 and sigma.shape == (512, 9)
    assert float(sigma.min()) >= lo and float(sigma.max()) <= hi and lo > 0
    x = sigma.reshape(-1).double()
    n = x.numel()
    assert _ks_distance(x, lambda v: ((v - lo) / (hi - lo)).clamp(0, 1), lo) < _ks_bound(n)
    sd = (hi - lo) / math.sqrt(12)
    assert abs(float(x.mean()) - (lo + hi) / 2) < 4 * sd / math.sqrt(n)
    # variance: sd of the sample variance of U is sqrt((m4 - sd^4) / n), m4 = (hi - lo)^4 / 80
    var_sd = math.sqrt(((hi - lo) ** 4 / 80 - sd ** 4) / n)
    assert abs(float(x.var(unbiased=False)) - sd ** 2) < 4 * var_sd
    assert len(set(x.tolist())) > 0.99 * n  # continuous: not table entries


def test_logit_normal_in_range_with_the_right_moments():
    mean, std = 0.3, 0.8
    sigma, table = _continuous("nft", "logit_normal", logit_normal=[mean, std])
    lo, hi = float(table[N_STEPS - 1]), float(table[0])  # 0.25 .. 1 with shift 3: about 4% of the mass clamps to lo
    assert float(sigma.min()) >= lo and float(sigma.max()) <= hi
    x = sigma.reshape(-1).double()
    n = x.numel()
    phi = lambda z: 0.5 * torch.erfc(-z / math.sqrt(2))  # noqa: E731

    def cdf(v):
        inside = phi((torch.log(v / (1 - v).clamp_min(1e-300)) - mean) / std)
        return torch.where(v >= hi, torch.ones_like(v), inside)
    assert _ks_distance(x, cdf, lo) < _ks_bound(n)
    # the clamped atom at lo holds P(sigmoid(mean + std z) < lo)
    atom = float(phi(torch.tensor((math.log(lo / (1 - lo)) - mean) / std, dtype=torch.float64)))
    assert abs(float((x == lo).double().mean()) - atom) < 4 * math.sqrt(atom * (1 - atom) / n)
    # moments of clamp(sigmoid(mean + std z), lo, hi) by quadrature
    z = torch.linspace(-12, 12, 400001, dtype=torch.float64)
    w = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    s = torch.sigmoid(mean + std * z).clamp(lo, hi)
    m1 = float(torch.trapezoid(w * s, z))
    var = float(torch.trapezoid(w * (s - m1) ** 2, z))
    assert abs(float(x.mean()) - m1) < 4 * math.sqrt(var / n)
    m4 = float(torch.trapezoid(w * (s - m1) ** 4, z))
    assert abs(float(x.var(unbiased=False)) - var) < 4 * math.sqrt((m4 - var ** 2) / n)


def test_continuous_draws_never_reach_zero_and_are_world_size_invariant():
    # an extreme logit-normal puts almost all mass below the range: it lands on sigma_min > 0, never on 0
    ctx, ro = _ctx("nft", timestep_sampling="logit_normal", logit_normal=[-30.0, 1.0])
    sigma = common.draw_points(ctx, ro).sigma
    assert (sigma == linear_sigmas(N_STEPS, shift=3.0)[N_STEPS - 1]).all() and (sigma > 0).all()
    one = _sigma_by_global("nft", world_size=1, micro=4, timestep_sampling="logit_normal")
    two = _sigma_by_global("nft", world_size=2, micro=2, timestep_sampling="logit_normal")
    assert all(torch.equal(one[i], two[i]) for i in one)


# --------------------------------------------------------------------------------- NFT defaults in a real run
@pytest.mark.slow
def test_nft_run_uses_the_additive_floor_and_the_official_choice(tmp_path, monkeypatch):
    from tests.test_engine_helpers import run_config as train_run, tiny_overrides
    floors, draws, stds = [], [], []
    real_adv, real_draw = kernels.group_advantages, common.draw_points

    def adv_spy(*a, **kw):
        floors.append(kw.get("std_floor"))
        out = real_adv(*a, **kw)
        stds.append(float((out[2]["std"] + 1e-4).mean()))
        return out

    def draw_spy(ctx, ro, **kw):
        pts = real_draw(ctx, ro, **kw)
        draws.append((ro.epoch, ro.global_idx.clone(), pts.sigma.clone(), ctx.sigmas().clone(), ctx.cfg.seed))
        return pts

    monkeypatch.setattr(kernels, "group_advantages", adv_spy)
    monkeypatch.setattr(common, "draw_points", draw_spy)
    run = str(tmp_path / "nft")
    # N = 4 sampler steps, K = 2 (tiny_overrides): the official pool is all 4 sigmas, fraction's only 3
    train_run(tiny_overrides(run), config="configs/testbed_nft.yaml", method="nft")
    assert floors and set(floors) == {"additive"}
    assert len(draws) == 2
    seen_cleanest = False
    for epoch, idx, sigma, table, seed in draws:
        assert torch.equal(sigma, table[_old_discrete(idx, 4, 2, seed, epoch)])
        seen_cleanest |= bool((sigma == table[3]).any())
    assert seen_cleanest  # the cleanest nonzero sigma (excluded by fraction) is trained on
    with open(os.path.join(run, "metrics.jsonl")) as f:
        logged = [rec["advantage/std"] for rec in map(json.loads, f) if "advantage/std" in rec]
    assert logged and set(logged) <= set(stds)  # the logged std is the divisor std + 1e-4
