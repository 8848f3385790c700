"""Flow-GRPO end to end through the engine on the tiny SD3(.5) and FLUX.1-dev configs (random weights, VAE latents,
text encoders, LoRA), with CFG and the KL to the pretrained model: the on-policy ratio is exactly 1 on each epoch's
first optimizer step and the ratios move after an update."""
from __future__ import annotations

import pytest

from tests.test_engine_helpers import run_config
from tests.test_grpo_engine import CONFIG, grpo_overrides, records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from models.tiny import save_tiny_flux, save_tiny_sd3
    root = tmp_path_factory.mktemp("grpo_families")
    return {"sd3": save_tiny_sd3(root / "sd3"), "flux": save_tiny_flux(root / "flux", "dev")}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_grpo_runs_on_family(tmp_path, tiny_dirs, family):
    run = str(tmp_path / family)
    run_config(grpo_overrides(run, **{"model.family": family, "model.path": str(tiny_dirs[family]),
                                      "model.random_init": "false", "model.resolution": 16, "train.epochs": 1,
                                      "grpo.cfg_scale": 2.0}), config=CONFIG)
    steps = records(run)
    assert len(steps) == 2
    assert steps[0]["ratio_first_dev/max"] == 0.0 and steps[0]["ratio/min"] == 1.0 == steps[0]["ratio/max"]
    assert steps[0]["kl_loss/max"] == 0.0 and steps[1]["kl_loss/max"] > 0
    assert all(s["grad_norm"] > 0 for s in steps)
    assert steps[1]["ratio/max"] - steps[1]["ratio/min"] > 0
