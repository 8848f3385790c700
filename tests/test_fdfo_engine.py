"""FDFO through the engine (``--method fdfo``) on a tiny random testbed model: end to end, the on-policy ratio
logged per epoch, and a 2-process gloo run equal to the 1-process run."""
from __future__ import annotations

import json
import os
import socket

import pytest

from tests.test_engine_helpers import ROOT, distributed_worker, run_config, tiny_overrides

pytestmark = pytest.mark.slow

CONFIG = "configs/testbed_fdfo.yaml"


def fdfo_overrides(run_dir: str, **extra) -> list[str]:
    """The testbed FDFO recipe shrunk to seconds: 4 prompts (pairs), a 3-step pair sampler, 2 optimizer steps."""
    base = {"data.group_size": 2, "data.prompts_per_epoch": 4, "train.micro_batch_size": 2,
            "train.gradient_steps_per_epoch": 2, "fdfo.num_steps": 3, "fdfo.micro_batch_items": 4,
            "fdfo.gamma": 0.05, "train.lr": 1e-3}
    base.update(extra)
    return tiny_overrides(run_dir, **base)


def records(run_dir, kind="step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_fdfo_end_to_end_ratio_is_exactly_one_on_each_epochs_first_micro_step(tmp_path):
    run = str(tmp_path / "fdfo")
    last = run_config(fdfo_overrides(run, **{"train.epochs": 2}), config=CONFIG)
    steps = records(run)
    assert len(steps) == 4
    for first in (steps[0], steps[2]):
        assert first["ratio_first_dev/max"] == 0.0 and first["ratio/min"] == 1.0 == first["ratio/max"]
    # the second optimizer step of an epoch runs after an update: the ratio has moved (so the check can fail)
    assert steps[1]["ratio/max"] - steps[1]["ratio/min"] > 0
    assert all(s["grad_norm"] > 0 and s["lr"] == pytest.approx(1e-3) for s in steps)
    assert last["reward/mean"] == last["reward/mean"] and "reward/bad_samples" in last


def test_fdfo_with_cfg_and_kl_runs(tmp_path):
    run = str(tmp_path / "cfg")
    run_config(fdfo_overrides(run, **{"train.epochs": 1, "fdfo.cfg_scale": 2.0, "fdfo.kl_lambda": 0.1,
                                      "fdfo.storage_dtype": "bf16"}), config=CONFIG)
    steps = records(run)
    assert len(steps) == 2 and steps[0]["kl/mean"] == 0.0 and steps[1]["kl/mean"] > 0  # policy == pretrained at first


def test_fdfo_config_errors(tmp_path):
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="data.group_size"):
        run_config(fdfo_overrides(str(tmp_path / "g"), **{"data.group_size": 4}), config=CONFIG)
    with pytest.raises(ConfigError, match="fdfo.storage_dtype"):
        run_config(fdfo_overrides(str(tmp_path / "d"), **{"fdfo.storage_dtype": "fp16"}), config=CONFIG)


def test_two_process_run_equals_one_process_run(tmp_path):
    """ZeRO-2 and ZeRO-3 on 2 gloo processes give the 1-process per-step metrics (2 optimizer steps each)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {2: {"train.epochs": 1, "deepspeed.zero_stage": 2}, 3: {"train.epochs": 1, "deepspeed.zero_stage": 3}}
    two = [fdfo_overrides(str(tmp_path / f"two_z{z}"), **extra) for z, extra in runs.items()]
    mp.start_processes(distributed_worker, args=(2, port, two, None, CONFIG), nprocs=2, join=True,
                       start_method="spawn")
    for z, extra in runs.items():
        one = str(tmp_path / f"one_z{z}")
        run_config(fdfo_overrides(one, **extra), config=CONFIG)
        a, b = records(one), records(str(tmp_path / f"two_z{z}"))
        assert len(a) == len(b) == 2 * extra["train.epochs"]
        for x, y in zip(a, b):
            for key in ("loss/mean", "ratio/mean", "ratio/max", "ratio/min", "grad_norm"):
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (z, key)
        ea, eb = records(one, "epoch"), records(str(tmp_path / f"two_z{z}"), "epoch")
        assert [e["reward/mean"] for e in ea] == pytest.approx([e["reward/mean"] for e in eb], rel=1e-5)


@pytest.mark.parametrize("recipe,steps", [("configs/testbed_fdfo.yaml", 10), ("configs/sd35m_pickscore_fdfo.yaml", 40),
                                          ("configs/sd35m_pickscore_fdfo_fast.yaml", 10)])
def test_fdfo_recipes_load_and_fit_the_batch_arithmetic(recipe, steps):
    from engine.batch import derive_batch
    from engine.config import load_config
    from engine.methods.fdfo import FDFOConfig

    cfg = load_config(os.path.join(ROOT, recipe))
    assert cfg.method == "fdfo" and isinstance(cfg.algo, FDFOConfig) and cfg.algo.num_steps == steps
    # the paper's optimizer (lr 3e-5) in the real-scale recipes; the CPU-sized testbed recipe moves faster (1e-4)
    assert cfg.train.gradient_steps_per_epoch == 4 and cfg.train.weight_decay == 1e-4
    assert cfg.train.lr == (1e-4 if "testbed" in recipe else 3e-5)
    for world in (1, 2, 8) if "sd35m" in recipe else (1, 2):
        derive_batch(world, cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.micro_batch_size,
                     cfg.train.gradient_steps_per_epoch, 1, exact_groups=False)


def test_fdfo_eval_samples_with_its_own_sampler_settings(tmp_path):
    import torch

    from engine.config import load_config
    from engine.context import build
    from models.samplers import sample_ode
    from tests.test_engine_helpers import register_test_rewards

    register_test_rewards()
    ctx, _ = build(load_config(os.path.join(ROOT, CONFIG), fdfo_overrides(str(tmp_path / "ev"),
                                                                         **{"fdfo.cfg_scale": 2.0})))
    cond = ctx.model.encode(["a red circle", "two blue squares"])
    z = torch.randn(2, *ctx.model.latent_shape(8, 8), generator=torch.Generator().manual_seed(0))
    x0 = ctx.method.eval_sample(ctx, z, cond)
    ref = sample_ode(ctx.model, z, cond, ctx.model.sigmas(3), adapter="policy", cfg_scale=2.0)
    torch.testing.assert_close(x0, ref, rtol=0, atol=0)
    ctx.logger.close()


def test_fdfo_nan_rewards_drop_their_pairs_or_abort(tmp_path):
    from engine.methods.common import RewardFailure

    run = str(tmp_path / "nan")
    with pytest.warns(RuntimeWarning, match="NaN/failed rewards"):
        run_config(fdfo_overrides(run, **{"train.epochs": 1, "rewards": "[{name: engine_test_nan, kwargs: "
                                          "{fraction_prompts: 0.5}}]", "train.max_bad_reward_fraction": 1.0,
                                          "data.prompts_per_epoch": 8}), config=CONFIG)
    epoch = records(run, "epoch")[0]
    assert epoch["reward/bad_samples"] > 0 and epoch["reward/dropped_samples"] % 2 == 0
    assert epoch["reward/dropped_samples"] >= epoch["reward/bad_samples"]
    assert epoch["reward/mean"] == epoch["reward/mean"]  # the mean over the kept pairs is finite
    with pytest.raises(RewardFailure, match="NaN"):
        run_config(fdfo_overrides(str(tmp_path / "abort"), **{"train.epochs": 1,
                                                               "rewards": "[{name: engine_test_nan}]"}), config=CONFIG)
