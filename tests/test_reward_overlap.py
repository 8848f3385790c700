"""``train.overlap_rewards``: each rollout chunk is scored in a worker thread while the next is sampled, with the
same rewards, final weights and metrics as scoring after the whole rollout (tiny testbed CRD, one process)."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from engine.rewards import RewardSet, WeightedReward
from engine.rewards.async_backend import ChunkScoring
from tests.test_engine_helpers import ROOT, register_test_rewards, tiny_overrides

#: clocks and memory differ between any two runs; everything else in a record must be equal
TIMING = ("time/", "throughput/", "memory/")


def build(run_dir: str, overlap: bool, **extra):
    register_test_rewards()
    from engine.config import load_config
    from engine.context import build as build_context
    # rollout.batch_size 3: this rank's 8 samples come in chunks of 3, 3 and 2 (a partial last chunk)
    cfg = load_config(os.path.join(ROOT, "configs/testbed_crd.yaml"),
                      tiny_overrides(run_dir, **{"rollout.batch_size": 3, "train.overlap_rewards": overlap,
                                                 "train.kernel_backend": "torch", **extra}))
    ctx, _ = build_context(cfg)
    scores = []
    real = ctx.method.advantages

    def spy(c, ro, s):  # what the method receives from the loop
        scores.append({k: v.clone() for k, v in s.items()})
        return real(c, ro, s)

    ctx.method.advantages = spy
    ctx.initial_weights = weights(ctx)
    return ctx, scores


def run(ctx, epochs: int = 2):
    from engine.loop import run_epoch
    out = []
    try:
        for e in range(epochs):
            last, images, steps = run_epoch(ctx, e)
            out.append((last, images, steps))
    finally:
        ctx.logger.close()
    return out


def untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith(TIMING)}


def weights(ctx) -> dict[str, torch.Tensor]:
    return {f"{a}.{k}": p.detach().clone() for a in ctx.model.adapters.names for k, p in
            ctx.model.adapters.params(a).items()}


@pytest.mark.parametrize("reward,extra", [("engine_test_toy", {}),
                                          # NaN for about half the prompts: their groups are dropped alike
                                          ("engine_test_nan", {"train.max_bad_reward_fraction": 1.0})],
                         ids=["toy", "nan_groups"])
def test_overlap_equals_scoring_after_bit_for_bit(tmp_path, reward, extra):
    spec = "[{name: engine_test_nan, kwargs: {fraction_prompts: 0.5}}]" if reward == "engine_test_nan" else \
        f"[{{name: {reward}}}]"
    runs = {}
    for overlap in (False, True):
        ctx, scores = build(str(tmp_path / str(overlap)), overlap, rewards=spec, **extra)
        assert ctx.cfg.train.overlap_rewards is overlap
        runs[overlap] = (run(ctx), scores, weights(ctx))
        initial = ctx.initial_weights
    (after, s_after, w_after), (over, s_over, w_over) = runs[False], runs[True]
    assert len(s_after) == len(s_over) == 2
    for a, b in zip(s_after, s_over):  # the rewards the method sees, every key, NaNs in the same places
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) or (torch.isnan(a[k]) == torch.isnan(b[k])).all() and \
                torch.equal(torch.nan_to_num(a[k]), torch.nan_to_num(b[k])), k
    if reward == "engine_test_nan":  # the invalid-sample path really ran, with valid samples beside it
        valid = torch.cat([s["valid"] for s in s_after])
        assert not valid.all() and valid.any()
    for (la, ia, sa), (lb, ib, sb) in zip(after, over):
        assert untimed(la) == untimed(lb)
        assert [untimed(x) for x in sa] == [untimed(x) for x in sb] and len(sa) == 2
        assert torch.equal(ia, ib)
        assert "time/decode_s" in la and "time/decode_s" not in lb  # the overlapped run decoded chunk by chunk
    assert w_after.keys() == w_over.keys()
    assert all(torch.equal(w_after[k], w_over[k]) for k in w_after)
    assert any(not torch.equal(w_after[k], initial[k]) for k in w_after)  # the weights compared did train


def test_chunks_are_scored_in_a_worker_while_the_next_chunk_is_sampled(tmp_path, monkeypatch):
    """The first chunk's scoring waits until the sampler has started the third chunk: with overlap this happens
    (the sampler runs on while chunk 0 is scored); had the loop scored after the rollout, the wait would expire."""
    import models.samplers as samplers

    ctx, _ = build(str(tmp_path / "run"), True)
    started, third_started = [], threading.Event()
    real_ode = samplers.sample_ode

    def sample_ode(*args, **kw):
        started.append(threading.current_thread().name)
        if len(started) == 3:
            third_started.set()
        return real_ode(*args, **kw)

    monkeypatch.setattr(samplers, "sample_ode", sample_ode)
    calls = []
    inner = ctx.rewards.score

    def score(images, prompts, metadata):
        calls.append((threading.current_thread().name, len(prompts), torch.is_grad_enabled(),
                      third_started.wait(timeout=60) if not calls else None))
        return inner(images, prompts, metadata)

    ctx.rewards.score = score
    run(ctx, epochs=1)
    assert len(started) == 3 and all(n == threading.main_thread().name for n in started)
    assert [c[1] for c in calls] == [3, 3, 2]
    assert all(c[0].startswith("reward-overlap") for c in calls)
    assert calls[0][3] is True  # chunk 0 was being scored when the sampler started chunk 2
    assert all(c[2] for c in calls)  # scored with the loop's grad mode (enabled), as when scored after


class _Flaky:
    """Raises on its second call; NaN for the last sample of every batch it scores."""

    name = "flaky"

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("detector crashed")
        s = images.flatten(1).mean(1)
        s[-1] = float("nan")
        return {"flaky": s, "flaky_extra": s * 2}


def test_failures_invalidate_the_batch_they_hit_and_the_chunks_merge_in_order():
    torch.manual_seed(0)
    rewards = RewardSet([WeightedReward(_Flaky(), 1.0, "flaky")])
    x0 = torch.rand(8, 3, 4, 4)
    prompts, meta = [f"p{i}" for i in range(8)], [{}] * 8
    chunks = ChunkScoring(rewards, lambda x: x * 1)
    for start, stop in ((0, 3), (3, 6), (6, 8)):
        chunks.add(start, stop, x0[start:stop], prompts[start:stop], meta[start:stop])
    chunks.close()
    assert chunks.covers(8) and not chunks.covers(7)
    images, out = chunks.result()
    assert torch.equal(images, x0)
    expect = x0.flatten(1).mean(1)
    valid = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)  # rows 3-5: the call that raised
    assert torch.equal(out["valid"], valid)
    assert torch.equal(out["reward"][valid], expect[valid]) and out["reward"][~valid].isnan().all()
    assert out["flaky/extra"][3:6].isnan().all() and torch.equal(out["flaky/extra"][:2], 2 * expect[:2])
    assert "rows 3-5: RuntimeError: detector crashed" in rewards.last_errors["flaky"]
    assert "rows 0-2: 1 of 3 scores are NaN" in rewards.last_errors["flaky"]


def test_a_rollout_without_chunks_is_scored_after():
    chunks = ChunkScoring(RewardSet([WeightedReward(_Flaky(), 1.0, "flaky")]), lambda x: x)
    assert not chunks.covers(4)  # nothing handed over (a method with its own sampler): the loop scores after
    chunks.add(0, 2, torch.zeros(2, 3, 1, 1), ["a", "b"], [{}, {}])
    assert not chunks.covers(4) and chunks.covers(2)
    chunks.close()
