"""``benchmarks/realscale_cpu.py`` at a tiny size, so its machinery cannot rot: the real entry point on 2 gloo ranks
under ZeRO-3 (RandomSD3's tiny preset at 1 block, 32 px), the per-rank memory records, the meta-device counts the
plan uses against what the run held, the plan's lines, DeepSpeed's estimators, and the Markdown report."""
from __future__ import annotations

import json
import math

from benchmarks import realscale_cpu as rs
from benchmarks.memory_plan import ACT_BYTES_SD3_BLOCK


def test_realscale_machinery_tiny(tmp_path):
    out = tmp_path / "rs"
    assert rs.main(["--preset", "tiny", "--blocks", "1", "--resolution", "32", "--stages", "3", "--group", "2",
                    "--steps", "3", "--k", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (row,), (cmp,) = res["rows"], res["compare"]
    assert [r["rank"] for r in row["ranks"]] == [0, 1]
    meta = rs.meta_counts(1, preset="tiny")
    for r in row["ranks"]:
        assert r["exit_code"] == 0
        # the epoch ran through the real loop and trained: finite loss, the policy adapter is what DeepSpeed trains
        assert math.isfinite(r["metrics"]["loss/mean"])
        assert 0 < r["baseline_bytes"] < r["epoch_start_bytes"] <= r["epoch_hwm_bytes"]
        c = r["counts"]
        # the plan's meta-device counts are the run's networks: base, buffers, every LoRA adapter
        assert c["transformer_base"] == meta["transformer_base"]
        assert c["buffers"] == meta["buffers"]
        assert c["trainable"] == meta["trainable"] == c["lora"]["policy"]
        assert set(c["lora"]) >= {"policy", "old", "sampler"}
        assert all(v == meta["trainable"] for v in c["lora"].values())
    plan = cmp["plan"]
    assert math.isclose(plan["total"], sum(plan["lines"].values()))
    assert 0 < plan["states_total"] < plan["total"]
    # ZeRO-3 partitions the frozen base: half of its partitioned elements per rank, its small parameters whole
    base = next(v for k, v in plan["lines"].items() if k.startswith("transformer base"))
    assert math.isclose(base, 2 * (meta["base_persistent"] + (meta["transformer_base"] - meta["base_persistent"]) / 2))
    assert all(v > 0 for v in cmp["ds"].values())
    text = (out / "report.md").read_text()
    assert "| 3 |" in text and "Extrapolated" in text and "24 blocks" in text


def test_lora_plan_stage_arithmetic():
    counts = {"transformer_base": 1000, "base_persistent": 100, "buffers": 10, "trainable": 8, "width": 4,
              "lora": {"policy": 8, "old": 8, "sampler": 8}, "text": 50, "vae": 5}
    kw = dict(world=2, micro_batch=1, resolution=32, blocks=1, text_tokens=4, reduce_bucket=16)
    z2, z3 = rs.planned(counts, stage=2, **kw), rs.planned(counts, stage=3, **kw)
    key2 = next(k for k in z2["lines"] if k.startswith("transformer base"))
    key3 = next(k for k in z3["lines"] if k.startswith("transformer base"))
    assert z2["lines"][key2] == 2 * 1000 and z3["lines"][key3] == 2 * (100 + 900 / 2)
    assert z2["working_set"] == 0 and z3["working_set"] == 2 * 900
    # (32 / 16)^2 image tokens + 4 text tokens, width 4, the measured bytes per token and hidden unit at bf16
    assert z2["activations"] == 8 * 4 * ACT_BYTES_SD3_BLOCK
