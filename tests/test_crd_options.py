"""CRD's options of issue 17 (tiny testbed runs, one process): the reward scale (normalized or raw), the log-ratio's
reference (old or pretrained) and the logged distance of the reference from the CFG anchor."""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.errors import ConfigError
from tests.test_engine_helpers import run_config, tiny_overrides

pytestmark = pytest.mark.slow


def records(run_dir, kind="step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def spy_crd(monkeypatch):
    """Record every crd_loss call's inputs and every advantages call's (scores, result)."""
    import engine.methods.crd as crd_mod
    calls, advs = [], []
    real_loss, real_adv = crd_mod.kernels.crd_loss, crd_mod.CRD.advantages

    def loss_spy(*args, **kw):
        calls.append([a.detach().clone() for a in args])
        return real_loss(*args, **kw)

    def adv_spy(self, ctx, ro, scores):
        adv = real_adv(self, ctx, ro, scores)
        advs.append(({k: v.clone() for k, v in scores.items() if torch.is_tensor(v)}, adv))
        return adv

    monkeypatch.setattr(crd_mod.kernels, "crd_loss", loss_spy)
    monkeypatch.setattr(crd_mod.CRD, "advantages", adv_spy)
    return calls, advs


def test_raw_reward_scale_matches_the_raw_reward_and_logs_beta_itself(tmp_path, monkeypatch):
    calls, advs = spy_crd(monkeypatch)
    run = str(tmp_path / "raw")
    run_config(tiny_overrides(run, **{"crd.reward_scale": "raw", "crd.beta": 0.25, "train.epochs": 1}))
    (scores, adv), = advs
    raw = scores["reward"].float()
    torch.testing.assert_close(adv.raw, raw)
    assert not torch.allclose(adv.raw, adv.r01)  # the normalised r is still computed (rho), but not matched
    m = 4  # micro-batch rows; 2 steps x 1 micro-batch x 2 timesteps, in order
    for i, args in enumerate(calls):
        step = i // 2
        torch.testing.assert_close(args[5], raw[step * m:(step + 1) * m])
    epoch, = records(run, "epoch")
    assert epoch["crd/beta_eff"] == 0.25


def test_normalized_reward_scale_is_the_default_and_matches_r01(tmp_path, monkeypatch):
    calls, advs = spy_crd(monkeypatch)
    run_config(tiny_overrides(str(tmp_path / "norm"), **{"train.epochs": 1}))
    (_, adv), = advs
    assert adv.raw is None
    torch.testing.assert_close(calls[0][5], adv.r01[:4])


def test_pretrained_ratio_reference_keeps_no_old_snapshot(tmp_path, monkeypatch):
    import engine.methods.common as common
    seen = []
    real = common.snapshot_velocities

    def spy(ctx, ro, pts, adapter):
        seen.append((adapter, ctx.model.adapters.names))
        out = real(ctx, ro, pts, adapter)
        # the stored reference velocities ARE the pretrained model's (no CFG)
        mb = next(common.micro_batches(ctx, ro, pts, slice(0, 4)))
        with torch.no_grad():
            want = ctx.model.velocity(mb.x_t, mb.sigma, mb.cond, adapter="pretrained")
        torch.testing.assert_close(out[0:4, mb.ks[0]], want.to(out.dtype))
        return out

    monkeypatch.setattr(common, "snapshot_velocities", spy)
    run = str(tmp_path / "pre")
    run_config(tiny_overrides(run, **{"crd.ratio_reference": "pretrained", "train.epochs": 2}))
    assert [a for a, _ in seen] == ["pretrained", "pretrained"]
    assert "old" not in seen[0][1] and "sampler" in seen[0][1]
    steps = records(run)
    # epoch 2 starts with theta != pretrained: the log-ratio against the pretrained model is not 0 there
    assert max(abs(steps[2]["log_ratio_first_micro_step/max"]), abs(steps[2]["log_ratio_first_micro_step/min"])) > 0
    assert "decay/old" not in records(run, "epoch")[-1]


def test_reference_distance_from_the_anchor_is_logged_with_the_kl(tmp_path):
    run = str(tmp_path / "kl")
    run_config(tiny_overrides(run, **{"train.epochs": 1}))
    step = records(run)[0]
    assert step["kl_old_anchor/mean"] > 0  # theta_old (= pretrained at start) vs its own CFG-guided velocity
    run_off = str(tmp_path / "off")
    run_config(tiny_overrides(run_off, **{"train.epochs": 1, "crd.kl_beta": 0}))
    assert "kl_old_anchor/mean" not in records(run_off)[0]


@pytest.mark.parametrize("key,value", [("crd.reward_scale", "centered"), ("crd.ratio_reference", "ema")])
def test_bad_crd_option_values_are_one_sentence(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_config(tiny_overrides(str(tmp_path / "bad"), **{key: value}))
