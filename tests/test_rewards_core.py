"""RewardSet (weighted total, components, validity), the registry/specs and the async backend."""
import threading
import time

import pytest
import torch

from engine.errors import ConfigError
from engine.rewards import (AsyncRewards, Reward, RewardSet, RewardSpec, WeightedReward, build_reward,
                            build_rewards)


class MeanReward:
    """Mean pixel value (x scale) plus an extra component: a real function of the image, differentiable."""

    differentiable = True

    def __init__(self, name: str = "mean", scale: float = 1.0, delay: float = 0.0) -> None:
        self.name, self.scale, self.delay = name, scale, delay
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        m = images.mean(dim=(1, 2, 3)) * self.scale
        return {self.name: m, f"{self.name}_red": images[:, 0].mean(dim=(1, 2))}

    def score_differentiable(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)) * self.scale


class PromptLengthReward:
    name = "plen"
    differentiable = False

    def score(self, images, prompts, metadata):
        return {"plen": torch.tensor([float(len(p)) for p in prompts])}

    def score_differentiable(self, images, prompts, metadata):
        raise TypeError("not differentiable")


class FlakyReward:
    """NaN on prompts containing 'nan', raises on prompts containing 'boom'."""

    name = "flaky"
    differentiable = False

    def score(self, images, prompts, metadata):
        if any("boom" in p for p in prompts):
            raise RuntimeError("detector crashed")
        return {"flaky": torch.tensor([float("nan") if "nan" in p else 1.0 for p in prompts])}


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), [f"prompt {i}" for i in range(n)], [{} for _ in range(n)]


def test_protocol_is_runtime_checkable():
    assert isinstance(MeanReward(), Reward)


def test_weighted_total_and_components():
    images, prompts, meta = batch()
    rs = RewardSet([WeightedReward(MeanReward(), 0.5, "mean"), WeightedReward(PromptLengthReward(), 2.0, "plen")])
    out = rs.score(images, prompts, meta)
    assert set(out) == {"mean", "mean/red", "plen", "reward", "valid"}
    for k in ("mean", "mean/red", "plen", "reward"):
        assert out[k].dtype == torch.float32 and out[k].shape == (4,)
    assert torch.allclose(out["reward"], 0.5 * images.mean(dim=(1, 2, 3)) + 2.0 * 8.0)
    assert out["valid"].dtype == torch.bool and bool(out["valid"].all()) and rs.last_errors == {}


def test_nan_and_raising_rewards_are_reported_not_filled():
    images, _, meta = batch()
    rs = RewardSet([WeightedReward(MeanReward(), 1.0, "mean"), WeightedReward(FlakyReward(), 1.0, "flaky")])
    out = rs.score(images, ["a", "nan here", "b", "c"], meta)
    assert out["valid"].tolist() == [True, False, True, True]
    assert torch.isnan(out["reward"][1]) and torch.isfinite(out["reward"][[0, 2, 3]]).all()
    assert "1 of 4 scores are NaN" in rs.last_errors["flaky"]
    out = rs.score(images, ["a", "boom", "b", "c"], meta)  # the whole batch of a raising reward is invalid
    assert not out["valid"].any() and torch.isnan(out["reward"]).all() and torch.isnan(out["flaky"]).all()
    assert torch.isfinite(out["mean"]).all()  # other components still reported
    assert rs.last_errors["flaky"] == "RuntimeError: detector crashed"


def test_contract_violations_are_invalid_with_a_reason():
    class WrongShape(MeanReward):
        def score(self, images, prompts, metadata):
            return {self.name: torch.zeros(2)}

    rs = RewardSet([WeightedReward(WrongShape(), 1.0, "mean")])
    out = rs.score(*batch())
    assert not out["valid"].any() and "shape (2,), expected (4,)" in rs.last_errors["mean"]


def test_score_differentiable_weighted():
    images, prompts, meta = batch()
    images.requires_grad_(True)
    rs = RewardSet([WeightedReward(MeanReward(), 3.0, "mean"), WeightedReward(PromptLengthReward(), 0.0, "plen")])
    assert rs.differentiable
    rs.score_differentiable(images, prompts, meta).sum().backward()
    assert torch.allclose(images.grad, torch.full_like(images, 3.0 / (3 * 8 * 8)))
    rs2 = RewardSet([WeightedReward(PromptLengthReward(), 1.0, "plen")])
    with pytest.raises(TypeError, match=r"\['plen'\] are not differentiable"):
        rs2.score_differentiable(images, prompts, meta)


def test_bad_batches_and_sets():
    images, prompts, meta = batch()
    rs = RewardSet([WeightedReward(MeanReward(), 1.0, "mean")])
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        rs.score(images, prompts[:3], meta)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        rs.score(images[:, :1], prompts, meta)
    with pytest.raises(ValueError, match="duplicate reward keys"):
        RewardSet([WeightedReward(MeanReward(), 1.0, "m"), WeightedReward(MeanReward(), 1.0, "m")])
    with pytest.raises(ValueError, match="reserved"):
        RewardSet([WeightedReward(MeanReward(), 1.0, "reward")])


# ---------------------------------------------------------------- registry and specs

@pytest.fixture
def fake_registry(register_reward):
    register_reward("fake_mean", f"{__name__}:MeanReward")
    register_reward("fake_plen", f"{__name__}:PromptLengthReward")


def test_build_rewards_from_dicts(fake_registry):
    rs = build_rewards([{"name": "fake_mean", "weight": 2, "kwargs": {"scale": 10.0}},
                        {"name": "fake_plen", "weight": 0.5, "backend": "async"},
                        {"name": "fake_mean", "key": "mean2", "kwargs": {"name": "fake_mean"}}])
    assert [c.key for c in rs.components] == ["fake_mean", "fake_plen", "mean2"]
    assert isinstance(rs.components[1].reward, AsyncRewards)
    images, prompts, meta = batch()
    # the main score is read under reward.name; MeanReward's default name is "mean"
    with_name = build_rewards([{"name": "fake_mean", "kwargs": {"name": "fake_mean", "scale": 10.0}}])
    out = with_name.score(images, prompts, meta)
    assert torch.allclose(out["fake_mean"], 10 * images.mean(dim=(1, 2, 3)))
    assert "fake_mean/red" in out
    rs.close()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        build_rewards([{"name": "pickscor"}])
    for name in ("ocr", "geneval", "testbed_geneval", "testbed_classifier", "clip_score", "pickscore", "hps",
                 "aesthetic"):
        assert name in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ({"name": "ocr", "wieght": 1}, "unknown keys ['wieght']"),
    ({"weight": 1}, "missing 'name'"),
    ({"name": "ocr", "weight": "1"}, "weight of 'ocr' must be a finite number"),
    ({"name": "ocr", "weight": float("nan")}, "finite number"),
    ({"name": "ocr", "backend": "gpu"}, "backend of 'ocr' must be one of"),
    ({"name": "ocr", "kwargs": [1]}, "kwargs of 'ocr' must be a mapping"),
    ({"name": "ocr", "async_workers": 0}, "async_workers"),
    ("ocr", "expected a mapping"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError) as e:
        build_rewards([spec])
    assert "rewards[0]" in str(e.value) and message in str(e.value)
    with pytest.raises(ValueError, match="non-empty list"):
        build_rewards([])


def test_bad_kwargs_name_the_reward(fake_registry):
    with pytest.raises(ValueError, match="reward 'fake_mean': bad kwargs \\['colour'\\]"):
        build_reward({"name": "fake_mean", "kwargs": {"colour": 1}})


def test_missing_module_is_a_clear_config_error(register_reward):
    register_reward("ghost", "engine.no_such_module:Thing")
    with pytest.raises(ConfigError, match="module 'engine.no_such_module' cannot be imported"):
        build_reward(RewardSpec("ghost"))


# ---------------------------------------------------------------- async backend

def test_async_overlaps_sampling_and_keeps_order():
    sample_time, reward_time, k = 0.4, 0.4, 4  # ideal overlap 2.0 s, serial 3.2 s, bound 2.4 s
    reward = MeanReward(delay=reward_time)
    batches = [batch(seed=i) for i in range(k)]
    expected = [reward.score(*b)["mean"] for b in batches]
    with AsyncRewards(reward) as ar:
        t0 = time.perf_counter()
        results = []
        for i, b in enumerate(batches):
            time.sleep(sample_time)  # "sampling" batch i
            ar.submit(*b)
            if i:  # collect batch i-1 after submitting batch i
                results.append(ar.next_result())
        results.append(ar.next_result())
        wall = time.perf_counter() - t0
    serial = k * (sample_time + reward_time)
    assert wall < 0.75 * serial, f"no overlap: {wall:.2f}s vs serial {serial:.2f}s"
    for r, e in zip(results, expected):
        assert torch.equal(r["mean"], e)


def test_async_order_with_several_workers():
    class VariableDelay(MeanReward):
        def score(self, images, prompts, metadata):
            time.sleep(float(metadata[0]["delay"]))
            return super().score(images, prompts, metadata)

    ar = AsyncRewards(VariableDelay(), max_workers=3)
    delays = [0.3, 0.0, 0.15, 0.0]
    batches = []
    for i, d in enumerate(delays):
        images, prompts, _ = batch(seed=10 + i)
        batches.append(images)
        ar.submit(images, prompts, [{"delay": d}] * 4)
    got = [ar.next_result()["mean"] for _ in delays]
    for g, images in zip(got, batches):
        assert torch.equal(g, images.mean(dim=(1, 2, 3)))
    with pytest.raises(RuntimeError, match="no batch was submitted"):
        ar.next_result()
    ar.close()


def test_async_copies_images_so_buffers_can_be_reused():
    ar = AsyncRewards(MeanReward(delay=0.2))
    images, prompts, meta = batch()
    expected = images.mean(dim=(1, 2, 3))
    future = ar.submit(images, prompts, meta)
    images.zero_()  # the sampler overwrites its buffer while the reward runs
    assert torch.equal(future.result()["mean"], expected)
    ar.close()


def test_rewardset_submit_and_async_components_run_concurrently():
    r1, r2 = MeanReward("a", delay=0.5), MeanReward("b", delay=0.5)
    rs = RewardSet([WeightedReward(AsyncRewards(r1), 1.0, "a"), WeightedReward(AsyncRewards(r2), 1.0, "b")])
    images, prompts, meta = batch()
    t0 = time.perf_counter()
    out = rs.submit(images, prompts, meta).result()
    assert time.perf_counter() - t0 < 0.75 * 1.0  # both components scored at the same time
    assert torch.allclose(out["reward"], 2 * images.mean(dim=(1, 2, 3)))
    rs.close()
    assert threading.active_count() < 50


def test_async_errors_reach_the_caller_and_invalidate_in_a_set():
    images, _, meta = batch()
    with AsyncRewards(FlakyReward()) as ar:
        ar.submit(images, ["a", "boom", "b", "c"], meta)
        with pytest.raises(RuntimeError, match="detector crashed"):
            ar.next_result()
    rs = RewardSet([WeightedReward(MeanReward(), 1.0, "mean"), WeightedReward(AsyncRewards(FlakyReward()), 1.0, "f")])
    out = rs.score(images, ["a", "boom", "b", "c"], meta)
    assert not out["valid"].any() and rs.last_errors == {"f": "RuntimeError: detector crashed"}
    rs.close()
