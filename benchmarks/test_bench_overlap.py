"""Reward scoring overlapped with sampling (``train.overlap_rewards``): the engine's CRD epoch with a reward of fixed
latency, overlap on and off, interleaved rounds of one run.

The reward (``SleepyReward``) is the toy reward plus a sleep of ``MS_PER_IMAGE`` per image scored, the shape of an
OCR or remote reward server whose time grows with the images sent (and releases the GIL, as they do). Scored after
the rollout it adds its whole latency to the epoch; overlapped, each rollout chunk (``rollout.batch_size``) is
scored while the next is sampled, so only the last chunk's latency remains. Wall time (the sleep uses no CPU), one
torch thread; testbed model at its published size, P=2 x G=4, rollout chunks of 2 (4 chunks), 4 steps, K=2.
"""
from __future__ import annotations

import time

import pytest

from benchmarks.common import (build_engine, cpu_timing, crd_overrides, device_string, engine_epoch,
                               interleaved_times, load_crd_config, ratio_of_minima)

ROUNDS = 3
MS_PER_IMAGE = 150.0
#: overlap must not cost time (beyond shared-machine noise); the gain itself is reported, it depends on the latency
FLOOR = 0.95


class SleepyReward:
    """The toy reward (red minus blue mean) after sleeping ``ms_per_image`` per image: a fixed-latency reward."""

    name = "sleepy"

    def __init__(self, ms_per_image: float = MS_PER_IMAGE) -> None:
        self.ms = ms_per_image

    def score(self, images, prompts, metadata):
        time.sleep(self.ms * len(prompts) / 1000)
        return {"sleepy": (images[:, 0] - images[:, 2]).flatten(1).mean(1).float()}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from engine.rewards import REWARDS, register
    if "bench_sleepy" not in REWARDS.names():
        register("bench_sleepy", "benchmarks.test_bench_overlap:SleepyReward")
    ctxs = {}
    for on in (True, False):
        cfg = load_crd_config(crd_overrides(str(tmp_path_factory.mktemp(f"overlap_{on}")), reward="bench_sleepy",
                                            **{"rollout.batch_size": 2, "train.overlap_rewards": on}))
        assert cfg.train.overlap_rewards is on
        ctxs["overlap" if on else "after"] = build_engine(cfg)
    records = {k: [] for k in ctxs}

    def epoch_fn(name):
        return lambda r: records[name].append(engine_epoch(ctxs[name], r + 1))

    with cpu_timing():
        for ctx in ctxs.values():
            engine_epoch(ctx, 0)  # warm-up
        times = interleaved_times({k: epoch_fn(k) for k in ctxs}, ROUNDS)
    for ctx in ctxs.values():
        ctx.logger.close()
    return {"times": times, "records": records,
            "ratio": ratio_of_minima(times["wall:after"], times["wall:overlap"])}


def test_overlap_hides_reward_latency(benchmark, measured, record_ratio):
    t, rec = measured["times"], measured["records"]
    reward_s = {k: min(r["time/reward_s"] for r in v) for k, v in rec.items()}
    rollout_s = {k: min(r["time/rollout_s"] for r in v) for k, v in rec.items()}
    text = (f"{device_string()}: epoch wall min {min(t['wall:after']):.2f}s scored after vs "
            f"{min(t['wall:overlap']):.2f}s overlapped -> after/overlap = {measured['ratio']:.2f}x "
            f"(reward {MS_PER_IMAGE:.0f} ms/image, 8 images, chunks of 2; {ROUNDS} interleaved rounds, 1 torch thread; "
            f"reward phase {reward_s['after']:.2f}s -> {reward_s['overlap']:.2f}s, rollout phase "
            f"{rollout_s['after']:.2f}s -> {rollout_s['overlap']:.2f}s); floor {FLOOR}")
    record_ratio("reward overlap after/overlap", text)
    benchmark.extra_info.update(ratio=measured["ratio"], after_wall_s=t["wall:after"],
                                overlap_wall_s=t["wall:overlap"], reward_s=reward_s, rollout_s=rollout_s)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    # the scores the two runs trained on are the same (tests/test_reward_overlap.py checks it bit for bit)
    assert [r["reward/mean"] for r in rec["after"]] == [r["reward/mean"] for r in rec["overlap"]]
    assert measured["ratio"] >= FLOOR, text
