"""CRD/NFT end to end on CPU (tiny random testbed model, one process): invariants, resume, checkpoints, bad input."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.checkpoint import CheckpointError, Checkpointer, read_tree
from engine.errors import ConfigError
from engine.methods.common import RewardFailure
from tests.test_engine_helpers import ROOT, clean_env, run_config, step_losses, tiny_overrides

pytestmark = pytest.mark.slow


def records(run_dir, kind="step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_crd_end_to_end_and_first_micro_step_log_ratio_is_exactly_zero(tmp_path):
    # lam_old = 0: theta_old = theta after every epoch, so EVERY epoch starts with theta == theta_old
    run = str(tmp_path / "crd")
    last = run_config(tiny_overrides(run, **{"crd.old_schedule": "0-0.0-0.0-0.0", "train.epochs": 2,
                                             "train.lr": 3e-4, "log.grid_every": 1, "eval.num_prompts": 3,
                                             "data.test_prompts": os.path.join(ROOT, "data/testbed/test.jsonl")}))
    steps = records(run)
    assert len(steps) == 4
    for first in (steps[0], steps[2]):
        assert first["log_ratio_first_micro_step/max"] == 0.0 and first["log_ratio_first_micro_step/min"] == 0.0
    # ... and the log-ratio does move once theta has been updated within the epoch (so the check can fail)
    assert max(abs(steps[1]["log_ratio/max"]), abs(steps[1]["log_ratio/min"])) > 0
    assert all(s["grad_norm"] > 0 and s["lr"] == pytest.approx(3e-4) for s in steps)
    assert last["reward/mean"] == last["reward/mean"] and "kl/mean" in last and "decay/sampler" in last
    assert os.path.isfile(os.path.join(run, "samples", "epoch00002.png"))
    for e in records(run, "epoch"):  # the temperature in reward units: 2 A_max beta std(R), beta 0.5 (the recipe)
        assert e["crd/beta_eff"] == pytest.approx(2 * 5.0 * 0.5 * max(e["reward/std"], 1e-6), rel=1e-5)
    evals = records(run, "eval")  # before and after, on held-out prompts
    assert len(evals) == 2 and all(abs(e["eval/reward"]) <= 1 for e in evals)


@pytest.mark.parametrize("adaptive", ["false", "true"])
def test_crd_without_kl_is_centered_reward_matching(tmp_path, monkeypatch, adaptive):
    """kl_beta = 0 switches the KL off, adaptive or not (kl_min then weighs nothing and the pretrained anchor is not
    run): every micro-step loss equals (A/beta) mean(beta lc - rc)^2 computed here."""
    import engine.methods.crd as crd_mod

    calls = []
    real = crd_mod.kernels.crd_loss

    def spy(*args, **kw):
        loss, st = real(*args, **kw)
        calls.append(([a.detach().clone() for a in args], kw, loss.detach().clone()))
        return loss, st

    monkeypatch.setattr(crd_mod.kernels, "crd_loss", spy)
    run_config(tiny_overrides(str(tmp_path / "m"), **{"crd.adaptive_kl": adaptive, "crd.kl_beta": 0,
                                                     "crd.kl_min": 1e-3, "crd.beta": 0.5, "train.epochs": 1}))
    assert len(calls) == 4  # 2 optimizer steps x 1 micro-batch x 2 timesteps
    for (v, v_old, u, v_pc, v_pu, r01, _, gids), kw, loss in calls:
        assert kw["kl_beta"] == 0.0 and kw["kl_min"] == 0.0
        assert torch.equal(v_pc, v) and torch.equal(v_pu, v)  # no anchor forward: its stand-in is v itself
        f = lambda t: t.reshape(t.shape[0], -1).double()
        w_th = (f(v) - f(u)).abs().mean(1).clamp_min(1e-5)
        w_old = (f(v_old) - f(u)).abs().mean(1).clamp_min(1e-5)
        l = -((f(v) - f(u)).square().mean(1) / w_th - (f(v_old) - f(u)).square().mean(1) / w_old)
        same = (gids[:, None] == gids[None, :]).double()
        lc = l - same @ l / same.sum(1)
        rc = r01.double() - same @ r01.double() / same.sum(1)
        expect = (5.0 / 0.5) * (0.5 * lc - rc).square().mean()
        torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-8)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = {"train.epochs": 2, "checkpoint.every": 1, "checkpoint.keep": 5,
              "crd.sampler_schedule": "0-0.5-0.0-0.5"}  # a moving sampler snapshot: its state must be restored
    run_config(tiny_overrides(full, **common))
    run_config(tiny_overrides(split, **{**common, "train.epochs": 1}))  # "stopped" after optimizer step 2
    run_config(tiny_overrides(split, **{**common, "checkpoint.resume": "auto"}))
    a, b = step_losses(full), step_losses(split)
    assert len(a) == len(b) == 4 and a == b  # exact equality, CPU fp32
    for name in ("ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        pa, pb = (os.path.join(r, "checkpoints", "step-00000004", name) for r in (full, split))
        if not os.path.exists(pa):
            continue
        sa, sb = torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)
        _assert_same(sa.get("module", sa), sb.get("module", sb))
    _assert_same(read_tree(os.path.join(full, "checkpoints/step-00000004/snapshots_rank0.safetensors")),
                 read_tree(os.path.join(split, "checkpoints/step-00000004/snapshots_rank0.safetensors")))


def _assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    run = str(tmp_path / "kill")
    flag = str(tmp_path / "paused")
    ov = tiny_overrides(run, **{"train.epochs": 2, "checkpoint.every": 1})
    code = ("import sys; sys.path.insert(0, %r); from tests.test_engine_helpers import run_config; run_config(%r)"
            % (ROOT, ov))
    env = dict(clean_env(), DS_ACCELERATOR="cpu", RLFLOW_CKPT_PAUSE=flag, RLFLOW_CKPT_PAUSE_STEP="4")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not os.path.exists(flag):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the writer never reached the second checkpoint"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)  # killed half-way through writing step 4
    finally:
        proc.wait()
    root = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(root)) == [".tmp-step-00000004", "step-00000002"]
    # the previous checkpoint loads and training continues from it
    run_config(tiny_overrides(run, **{"train.epochs": 2, "checkpoint.every": 1, "checkpoint.resume": "auto"}))
    assert sorted(os.listdir(root)) == ["step-00000002", "step-00000004"]
    losses = step_losses(run)  # the killed run logged steps 1-4; the resumed one rewound them to 2, redid 3-4
    assert len(losses) == 4 and [r["step"] for r in records(run)] == [1, 2, 3, 4]


def test_out_of_disk_at_checkpoint_is_clear_and_leaves_nothing_partial(tmp_path, monkeypatch):
    import engine.checkpoint as ck

    real, calls = ck.rng_state, []

    def full_disk():
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real()

    monkeypatch.setattr(ck, "rng_state", full_disk)
    run = str(tmp_path / "disk")
    with pytest.raises(CheckpointError, match="out of disk space.*previous checkpoint .*step-00000002.* is kept"):
        run_config(tiny_overrides(run, **{"train.epochs": 2, "checkpoint.every": 1}))
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step-00000002"]


def test_nan_rewards_drop_their_groups_and_failures_abort(tmp_path):
    run = str(tmp_path / "nan")
    last = run_config(tiny_overrides(run, **{"rewards": "[{name: engine_test_nan, kwargs: {fraction_prompts: 0.5}}]",
                                             "train.epochs": 2, "train.max_bad_reward_fraction": 0.9,
                                             "data.prompts_per_epoch": 4, "train.micro_batch_size": 8}))
    epochs = records(run, "epoch")
    assert any(e["reward/dropped_samples"] > 0 for e in epochs)
    assert all(e["reward/dropped_samples"] % 4 == 0 for e in epochs)  # whole groups of G = 4
    assert all(s["loss/mean"] == s["loss/mean"] for s in records(run))  # no NaN reached the loss
    with pytest.raises(RewardFailure, match="NaN or failed .*max_bad_reward_fraction=0.25.*exploded"):
        run_config(tiny_overrides(str(tmp_path / "raise"), **{"rewards": "[{name: engine_test_raise}]"}))
    assert last["epoch"] == 1


def test_bad_input_fails_early_with_one_sentence(tmp_path):
    run = str(tmp_path / "bad")
    with pytest.raises(ConfigError, match="prompt file '/nonexistent.jsonl' does not exist"):
        run_config(tiny_overrides(run, **{"data.train_prompts": "/nonexistent.jsonl"}))
    with pytest.raises(ConfigError, match=r"1 \* 3 = 3 is not a multiple of group_size 8"):
        run_config(tiny_overrides(run, **{"data.group_size": 8, "train.micro_batch_size": 3,
                                          "data.prompts_per_epoch": 3, "train.gradient_steps_per_epoch": 1}))
    with pytest.raises(ConfigError, match="'checkpoint.resume': '/nowhere' is not a checkpoint"):
        run_config(tiny_overrides(run, **{"checkpoint.resume": "/nowhere"}))


def test_nft_runs_end_to_end(tmp_path):
    run = str(tmp_path / "nft")
    last = run_config(tiny_overrides(run, **{"train.epochs": 1}), config="configs/testbed_nft.yaml")
    assert "l_pos/mean" in last and last["decay/old"] == pytest.approx(0.002)
    assert len(step_losses(run)) == 2
    # engine.testbed.compare reports a training's progress from the epoch records of its metrics.jsonl
    from engine.testbed.compare import _epochs_logged
    assert _epochs_logged(run) == len(records(run, "epoch")) == 1
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"kind": "epo')  # a record being written is not counted (nor an error)
    assert _epochs_logged(run) == 1 and _epochs_logged(str(tmp_path / "missing")) == 0


def test_crd_on_a_tiny_sd3_family_model(tmp_path):
    from models.tiny import save_tiny_sd3

    path = save_tiny_sd3(tmp_path / "sd3")
    run = str(tmp_path / "sd3run")
    ov = [o for o in tiny_overrides(run, **{"model.family": "sd3", "model.path": str(path),
                                            "model.random_init": "false", "model.resolution": 32,
                                            "train.epochs": 1}) if not o.startswith("model.size")]
    run_config(ov)
    losses = step_losses(run)
    assert len(losses) == 2 and all(x == x for x in losses)
    assert step_losses(run, "log_ratio_first_micro_step/max") == [0.0]
