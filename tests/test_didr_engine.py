"""DIDR through the engine (``--method didr``) on a tiny random testbed model: a one-step flow generator over the
testbed model, its fake score and the frozen teacher (LoRA adapters of one network), end to end; and the clear
errors for what DIDR cannot use."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from engine.errors import ConfigError
from tests.test_engine_helpers import run_config, tiny_overrides

pytestmark = pytest.mark.slow

CONFIG = "configs/testbed_didr.yaml"


def didr_overrides(run_dir: str, **extra) -> list[str]:
    base = {"data.group_size": 2, "data.prompts_per_epoch": 4, "train.micro_batch_size": 2,
            "train.gradient_steps_per_epoch": 2, "train.lr": 1e-3, "didr.ta_lr": 1e-3, "didr.cfg_scale": 2.0,
            # a seconds-long regression initialisation (the recipe's is minutes)
            "didr.init_pairs": 8, "didr.init_regression_steps": 3, "didr.init_ode_steps": 2,
            "didr.init_batch_size": 4, "didr.init_ta_steps": 2}
    base.update(extra)
    return tiny_overrides(run_dir, **base)


def records(run_dir, kind="step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("mode,finetune", [("diffused", "lora"), ("terminal", "full")])
def test_didr_one_step_flow_generator_end_to_end(tmp_path, mode, finetune):
    """LoRA adapters (policy/fake on one network, teacher = LoRA off) and full copies (teacher = the original)."""
    run = str(tmp_path / mode)
    run_config(didr_overrides(run, **{"train.epochs": 1, "didr.reward_mode": mode, "didr.ta_steps": 2,
                                      "model.finetune": finetune}), config=CONFIG)
    steps = records(run)
    assert len(steps) == 2
    (init,) = records(run, "didr_init")  # the regression initialisation ran once, before the first step
    assert init["init/steps"] == 3 and math.isfinite(init["init/reg_loss_first"])
    # then the fake score's warm-up on the initialised generator
    assert init["init/ta_steps"] == 2 and math.isfinite(init["init/ta_loss_first"]) and init["init/ta_loss_last"] > 0
    for s in steps:
        assert s["grad_norm"] > 0 and s["ta_grad_norm"] > 0 and s["lr"] == pytest.approx(1e-3)
        assert all(s[k] == s[k] for k in ("generator_loss/mean", "ta_loss/mean", "reward/mean", "w/mean"))
    if mode == "diffused":  # reward = of the generator's samples; reward_drp = of the DRP's denoised estimates
        assert steps[0]["drp_rms/mean"] > 0 and all(s["reward_drp/mean"] == s["reward_drp/mean"] for s in steps)


def test_didr_fake_score_warm_up_alone(tmp_path):
    """init_ta_steps without a regression warm start: the fake score warms up on the raw generator (no ODE targets)."""
    run = str(tmp_path / "ta_only")
    run_config(didr_overrides(run, **{"train.epochs": 1, "didr.init_regression_steps": 0}), config=CONFIG)
    (init,) = records(run, "didr_init")
    assert init["init/steps"] == 0 and "init/reg_loss_first" not in init
    assert init["init/ta_steps"] == 2 and math.isfinite(init["init/ta_loss_first"]) and init["init/ta_loss_last"] > 0
    assert len(records(run)) == 2


def test_didr_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(ConfigError, match=r"differentiable reward.*\['ocr'\]"):
        run_config(didr_overrides(str(tmp_path / "ocr"), rewards="[{name: ocr}]", **{"train.epochs": 1}),
                   config=CONFIG)
    with pytest.raises(ConfigError, match="one-step generator.*didr.one_step=flow"):
        run_config(didr_overrides(str(tmp_path / "multi"), **{"didr.one_step": "auto", "train.epochs": 1}),
                   config=CONFIG)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        run_config(didr_overrides(str(tmp_path / "z"), **{"deepspeed.zero_stage": 2}), config=CONFIG)


def test_didr_recipes_load():
    import yaml

    from engine.batch import derive_batch
    from engine.config import load_config
    from engine.methods.didr import DIDRConfig
    from tests.test_engine_helpers import ROOT

    cfg = load_config(os.path.join(ROOT, "configs/testbed_didr.yaml"))
    assert cfg.method == "didr" and isinstance(cfg.algo, DIDRConfig) and cfg.algo.one_step == "flow"
    assert [r.name for r in cfg.rewards] == ["testbed_classifier"]
    # the SDXL-Turbo recipe names the native UNet one-step family
    path = os.path.join(ROOT, "configs/sdxl_turbo_didr.yaml")
    with open(path) as f:
        assert yaml.safe_load(f)["model"]["family"] == "onestep"
    cfg = load_config(path)
    assert cfg.model.family == "onestep"
    assert cfg.algo.ta_steps == 5 and cfg.algo.reward_mode == "diffused" and cfg.algo.one_step == "auto"
    for world in (1, 8):
        derive_batch(world, cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.micro_batch_size,
                     cfg.train.gradient_steps_per_epoch, 1, exact_groups=False)


def test_didr_eval_samples_are_the_one_step_generator(tmp_path):
    from engine.config import load_config
    from engine.context import build
    from models.samplers import one_step
    from tests.test_engine_helpers import ROOT, register_test_rewards

    register_test_rewards()
    ctx, _ = build(load_config(os.path.join(ROOT, CONFIG), didr_overrides(str(tmp_path / "ev"))))
    cond = ctx.model.encode(["a red circle", "two blue squares"])
    z = torch.randn(2, *ctx.model.latent_shape(8, 8), generator=torch.Generator().manual_seed(0))
    x0 = ctx.method.eval_sample(ctx, z, cond)
    torch.testing.assert_close(x0, one_step(ctx.engine.module.model, z, cond, adapter="policy"), rtol=0, atol=0)
    ctx.logger.close()


def test_didr_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    """DIDR's two optimizers are its own (not DeepSpeed's): their AdamW moments travel in ``method_rank0.safetensors``, so a
    run stopped after epoch 1 and resumed matches the uninterrupted one exactly (generator and TA losses)."""
    from tests.test_engine_helpers import step_losses

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = {"checkpoint.every": 1, "checkpoint.keep": 5, "didr.ta_steps": 1}
    run_config(didr_overrides(full, **{**common, "train.epochs": 2}), config=CONFIG)
    run_config(didr_overrides(split, **{**common, "train.epochs": 1}), config=CONFIG)
    from engine.checkpoint import read_tree
    state = read_tree(os.path.join(split, "checkpoints", "step-00000002", "method_rank0.safetensors"))
    assert set(state) == {"generator_opt", "ta_opt"} and state["generator_opt"]["state"]  # moments, not empty
    run_config(didr_overrides(split, **{**common, "train.epochs": 2, "checkpoint.resume": "auto"}), config=CONFIG)
    for key in ("generator_loss/mean", "ta_loss/mean"):
        a, b = step_losses(full, key), step_losses(split, key)
        assert len(a) == len(b) == 4 and a == b, (key, a, b)
