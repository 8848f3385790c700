"""Engine config, batch arithmetic, schedules, snapshots and metric reduction (fast, single process, no DeepSpeed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.batch import derive_batch
from engine.config import ConfigError, help_lines, load_config
from engine.runlog import StepStats
from engine.snapshots import Schedule, Snapshots
from tests.test_engine_helpers import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "testbed_crd.yaml")


def test_recipe_defaults_and_typed_overrides():
    cfg = load_config(RECIPE, ["train.lr=1e-4", "crd.kl_beta=0", "train.betas=[0.8, 0.99]", "deepspeed.zero_stage=3"])
    assert cfg.method == "crd" and cfg.train.lr == 1e-4 and cfg.algo.kl_beta == 0.0
    assert cfg.train.betas == [0.8, 0.99] and cfg.deepspeed.zero_stage == 3
    assert cfg.model.path == "checkpoints/testbed/base" and cfg.data.train_prompts == "data/testbed/train.jsonl"
    nft = load_config(os.path.join(ROOT, "configs", "testbed_nft.yaml"))
    assert nft.method == "nft" and nft.algo.old_schedule == "0-0.0-0.001-0.5"
    assert load_config(None, method="nft").algo.beta == 1.0  # every option has a working default


@pytest.mark.parametrize("override, message", [
    (["train.micro_batch_sise=4"], "unknown config key 'train.micro_batch_sise'"),
    (["train.micro_batch_size=four"], "'train.micro_batch_size' must be an integer"),
    (["train.lr=fast"], "'train.lr' must be a number"),
    (["log.tensorboard=3"], "'log.tensorboard' must be true or false"),
    (["crd.rho=vibes"], "'crd.rho' must be one of"),
    (["crd.old_schedule=0-0.25"], "'crd.old_schedule' must be a schedule"),
    (["deepspeed.zero_stage=4"], "'deepspeed.zero_stage' must be 0, 1, 2 or 3"),
    (["method=sgd"], "unknown method 'sgd'"),
    (["train.lr"], "must look like key=value"),
])
def test_bad_config_one_clear_sentence(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(RECIPE, override)
    assert "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_derive_batch_layout_and_refusals():
    lay = derive_batch(2, 4, 8, 4, 2, 3)  # W=2, P=4, G=8, m=4, S=2, K=3
    assert (lay.samples_per_rank, lay.micro_batches_per_step, lay.accumulation) == (16, 2, 6)
    assert lay.whole_groups and not lay.groups_local
    # every global micro-batch (both ranks' chunks at one micro-step) holds whole groups
    idx = torch.stack([lay.rank_indices(r) for r in range(2)])  # [W, n]
    for j in range(lay.samples_per_rank // lay.micro_batch_size):
        block = idx[:, j * 4:(j + 1) * 4].reshape(-1)
        groups = block // 8
        assert all(int((groups == g).sum()) == 8 for g in groups.unique())
    assert sorted(idx.reshape(-1).tolist()) == list(range(32))
    with pytest.raises(ConfigError, match=r"2 \* 3 = 6 is not a multiple of group_size 4"):
        derive_batch(2, 3, 4, 3, 1, 1)
    with pytest.raises(ConfigError, match=r"4 \* 4 = 16 samples must split into .* 3 \* 2 \* 4 = 24"):
        derive_batch(2, 4, 4, 4, 3, 1)
    assert not derive_batch(2, 3, 4, 3, 1, 1, exact_groups=False).whole_groups  # allowed for batch centering


def test_schedule_strings():
    old, samp = Schedule.parse("0-0.25-0.005-0.999"), Schedule.parse("75-0.0-0.0075-0.999")
    assert old(0) == 0.25 and old(10) == pytest.approx(0.3) and old(10_000) == 0.999
    assert samp(74) == 0.0 and samp(75) == 0.0 and samp(175) == pytest.approx(0.75)
    nft = Schedule.parse("0-0.0-0.001-0.5")
    assert nft(100) == pytest.approx(0.1) and nft(2000) == 0.5
    assert Schedule.parse("0-0-1e-3-0.5")(10) == pytest.approx(0.01)


def test_snapshot_ema_matches_formula():
    from models.lora import Adapters, LoraSettings

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("to_q", torch.nn.Linear(4, 4))
    ad = Adapters(net, ("policy", "old"), mode="lora", lora=LoraSettings(rank=2, target_modules=("to_q",)))
    with torch.no_grad():
        for p in ad.params("policy").values():
            p.add_(torch.randn_like(p))
    before = {k: p.clone() for k, p in ad.params("old").items()}
    snaps = Snapshots(ad, {"old": Schedule.parse("0-0.25-0.005-0.999")})
    out = snaps.update(10)
    assert out["decay/old"] == pytest.approx(0.3)
    for k, p in ad.params("old").items():
        expect = 0.3 * before[k] + 0.7 * ad.params("policy")[k]
        torch.testing.assert_close(p, expect, rtol=0, atol=1e-7)
    assert all(p.requires_grad for p in ad.params("policy").values())
    assert not any(p.requires_grad for p in ad.params("old").values())


def test_step_stats_reduce_once():
    class One:
        def all_reduce_sum(self, x):
            return x

        def all_reduce_max(self, x):
            return x

    st = StepStats()
    st.add("a", torch.tensor([1.0, 3.0]))
    st.add("a", torch.tensor([5.0]))
    out = st.reduce(One())
    assert out["a/mean"] == 3.0 and out["a/max"] == 5.0 and out["a/min"] == 1.0
    assert out["a/std"] == pytest.approx((8 / 3) ** 0.5)
    assert st.reduce(One()) == {}


def test_help_lists_every_option_and_cli_errors_exit_2():
    lines = "\n".join(help_lines())
    for key in ("train.micro_batch_size", "deepspeed.zero_stage", "checkpoint.resume", "data.group_size"):
        assert key in lines
    env = dict(clean_env(), DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "engine/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "crd.kl_beta" in out.stdout and "nft.old_schedule" in out.stdout
    assert "default 8" in out.stdout
    bad = subprocess.run([sys.executable, "engine/train.py", "--method", "crd", "train.epochs=many"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("config error: config key 'train.epochs' must be an integer, "
                                                   "got str 'many'")


@pytest.mark.parametrize("recipe, world", [("sd35m_geneval_crd.yaml", 8), ("sd35m_ocr_crd.yaml", 8),
                                           ("flux_dev_crd.yaml", 16)])
def test_real_scale_recipes_load_and_their_batches_derive(recipe, world):
    from engine.batch import eligible_timesteps
    cfg = load_config(os.path.join(ROOT, "configs", recipe))
    k = cfg.train.num_timesteps or eligible_timesteps(cfg.rollout.num_steps, cfg.train.timestep_fraction)
    lay = derive_batch(world, cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.micro_batch_size,
                       cfg.train.gradient_steps_per_epoch, k)
    assert lay.whole_groups and lay.accumulation >= k
