"""The testbed reward curve: training reward smoothed over epochs beside the loop's held-out eval points."""
import json

import pytest

from engine.testbed.plots import _smoothed, curve_series, reward_curve


def test_smoothed_is_a_centred_moving_mean():
    pts = [(1.0, 0.0), (2.0, 3.0), (3.0, 6.0), (4.0, 3.0)]
    assert _smoothed(pts, 3) == [(1.0, 1.5), (2.0, 3.0), (3.0, 4.0), (4.0, 4.5)]
    assert _smoothed(pts, 1) == pts


def test_reward_curve_reads_eval_points_and_smooths_training_reward(tmp_path):
    from PIL import Image

    # the loop's layout: eval at step 0 (before training), then every 3 epochs an eval record that repeats the
    # epoch's training metrics (reward/mean) after its epoch record
    recs = [{"kind": "eval", "step": 0, "eval/reward": 0.40}]
    for e in range(6):
        recs.append({"kind": "epoch", "step": 4 * (e + 1), "epoch": e, "reward/mean": 0.5 + 0.01 * e})
        if (e + 1) % 3 == 0:
            recs.append({"kind": "eval", "step": 4 * (e + 1), "reward/mean": 99.0, "eval/reward": 0.4 + 0.02 * e})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    plain = Image.open(reward_curve(str(metrics), str(tmp_path / "plain.png")))
    curve = Image.open(reward_curve(str(metrics), str(tmp_path / "curve.png"), smooth=3, title="a title"))
    assert curve.size == plain.size == (640, 360)
    colours = set(curve.getdata())
    assert (214, 39, 40) in colours and (31, 119, 180) in colours  # both series drawn
    assert curve.tobytes() != plain.tobytes()
    series = curve_series(str(metrics), ("reward/mean", "eval/reward"))
    assert series["eval/reward"] == [(0.0, 0.40), (3.0, pytest.approx(0.44)), (6.0, pytest.approx(0.50))]
    # the repeated reward/mean of eval records (99.0) is not read: one value per epoch, from the epoch records
    assert series["reward/mean"] == [(float(e + 1), pytest.approx(0.5 + 0.01 * e)) for e in range(6)]


def test_reward_curve_without_values_is_none(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "epoch", "step": 1, "epoch": 0}) + "\n")
    assert reward_curve(str(metrics), str(tmp_path / "c.png")) is None
