"""Unseen-metric helper on the real held-out DrawBench prompts with a deterministic fake generator."""
import os

import pytest
import torch

from engine.data import load_prompts
from engine.rewards import RewardSet, WeightedReward
from engine.rewards.unseen import UnseenMetrics, evaluate_unseen

DRAWBENCH = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "drawbench",
                                          "test.txt"))


class Brightness:
    name = "brightness"
    differentiable = False

    def score(self, images, prompts, metadata):
        return {"brightness": images.mean(dim=(1, 2, 3)), "brightness_red": images[:, 0].mean(dim=(1, 2))}


class FailsOnElephants:
    name = "picky"
    differentiable = False

    def score(self, images, prompts, metadata):
        return {"picky": torch.tensor([float("nan") if "elephant" in p.lower() else 2.0 for p in prompts])}


def generate(prompts, metadata):
    """Image brightness = (prompt length mod 10) / 10: deterministic per prompt."""
    return torch.stack([torch.full((3, 4, 4), (len(p) % 10) / 10) for p in prompts])


@pytest.fixture
def drawbench():
    if not os.path.isfile(DRAWBENCH):
        pytest.fail(f"held-out prompts {DRAWBENCH} are missing (../shared/data must sit beside the repo)")
    return load_prompts(DRAWBENCH, limit=37)


def test_means_over_the_whole_held_out_set(drawbench):
    rs = RewardSet([WeightedReward(Brightness(), 1.0, "brightness"), WeightedReward(FailsOnElephants(), 1.0, "picky")])
    calls = []

    def gen(prompts, metadata):
        calls.append(len(prompts))
        return generate(prompts, metadata)

    metrics = UnseenMetrics(rs, drawbench, trained=["pickscore"], batch_size=8)(gen)
    assert calls == [8, 8, 8, 8, 5]  # every held-out prompt exactly once
    expected = sum((len(p) % 10) / 10 for p in drawbench.prompts) / len(drawbench)
    assert metrics["unseen/brightness"] == pytest.approx(expected, rel=1e-5)
    assert metrics["unseen/brightness/red"] == pytest.approx(expected, rel=1e-5)
    n_eleph = sum("elephant" in p.lower() for p in drawbench.prompts)
    assert n_eleph >= 1
    assert metrics["unseen/picky"] == 2.0  # NaN samples are left out of the mean ...
    assert metrics["unseen/invalid_fraction"] == pytest.approx(n_eleph / len(drawbench))  # ... and counted


def test_refuses_trained_rewards_and_builds_from_specs(drawbench, register_reward):
    register_reward("brightness", f"{__name__}:Brightness")
    with pytest.raises(ValueError, match=r"\['brightness'\] are also trained on"):
        UnseenMetrics([{"name": "brightness"}], drawbench, trained=["brightness"])
    metrics = evaluate_unseen([{"name": "brightness"}], drawbench, generate, trained=["ocr"], prefix="eval/")
    assert set(metrics) == {"eval/brightness", "eval/brightness/red", "eval/invalid_fraction"}
    assert metrics["eval/invalid_fraction"] == 0.0
