"""A whole CRD epoch: the engine (``engine.loop`` body: rollout, decode, reward, advantages, update, snapshots)
vs the reference loop (``benchmarks/reference_loop.py``: the same math and draws in the reference-trainer
structure). One measurement, interleaved rounds; the ratio is asserted against ``thresholds.yaml``: the 0.8 floor
everywhere, the 1.5x goal on CUDA only (issue 21: on CPU both loops pay for the same FLOPs).

Testbed model at its published size (4 MMDiT layers, 4 heads x 32, 32x32 px; random weights), LoRA r16,
P=1 prompt x G=4 samples, 4-step rollouts, K=2 timesteps, one optimizer step; reward ``testbed_geneval``.
On CPU the times are process CPU times with one torch thread (``common.cpu_timing``: reproducible on a shared
machine); on CUDA wall times.
The engine's loss kernels run on the torch backend on CPU (``train.kernel_backend=torch`` from
``common.crd_overrides``). The engine runs with ``train.stack_timesteps=true`` (a micro-batch's K timesteps in one
stacked pass); the same engine with ``stack_timesteps=false`` (the default) is timed in the same rounds and its
ratio reported (not asserted), so the gain of stacking is measured in the same run.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import (build_engine, cpu_timing, crd_overrides, engine_epoch, interleaved_times,
                               load_crd_config, ratio_of_minima)
from benchmarks.reference_loop import build_reference, reference_crd_epoch

ROUNDS = 3
SETTINGS = {"data.prompts_per_epoch": 1, "train.gradient_steps_per_epoch": 1}


def epoch_overrides(run_dir: str) -> list[str]:
    return crd_overrides(run_dir, **SETTINGS)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    cfg = load_crd_config(epoch_overrides(str(tmp_path_factory.mktemp("epoch"))) + ["train.stack_timesteps=true"])
    cfg_unstacked = load_crd_config(epoch_overrides(str(tmp_path_factory.mktemp("epoch_unstacked")))
                                    + ["train.stack_timesteps=false"])
    assert cfg.train.stack_timesteps and not cfg_unstacked.train.stack_timesteps
    ctx, ctx_unstacked, ref = build_engine(cfg), build_engine(cfg_unstacked), build_reference(cfg)
    records = []

    def engine(r):
        records.append(engine_epoch(ctx, r + 1))

    def engine_unstacked(r):
        engine_epoch(ctx_unstacked, r + 1)

    def reference(r):
        reference_crd_epoch(ref, r + 1)

    with cpu_timing():
        engine_epoch(ctx, 0)  # warm-up (first-call allocations, lazy imports)
        engine_epoch(ctx_unstacked, 0)
        reference_crd_epoch(ref, 0)
        ref.seconds.clear()
        times = interleaved_times({"engine": engine, "reference": reference, "engine_unstacked": engine_unstacked},
                                  ROUNDS)
    return {"times": times, "ratio": ratio_of_minima(times["reference"], times["engine"]),
            "ratio_unstacked": ratio_of_minima(times["reference"], times["engine_unstacked"]), "records": records,
            "reference_phases": {k: v / ROUNDS for k, v in ref.seconds.items()}, "ctx": ctx}


def _describe(m) -> str:
    t = m["times"]
    clock = "CUDA wall time" if torch.cuda.is_available() else "CPU: process CPU time, 1 torch thread"
    return (f"engine epoch min {min(t['engine']):.2f}s, reference loop min "
            f"{min(t['reference']):.2f}s -> reference/engine = {m['ratio']:.2f}x "
            f"({ROUNDS} interleaved rounds, {clock}; wall-time ratio "
            f"{ratio_of_minima(t['wall:reference'], t['wall:engine']):.2f}x); engine without timestep stacking "
            f"min {min(t['engine_unstacked']):.2f}s -> reference/engine_unstacked = {m['ratio_unstacked']:.2f}x")


def test_crd_epoch_engine_vs_reference(benchmark, measured, thresholds, record_ratio):
    """Regression floor: the engine must not fall behind the reference loop (beyond shared-machine noise)."""
    floor = thresholds["crd_epoch_vs_reference"]["floor"]
    record_ratio("crd_epoch reference/engine", _describe(measured) + f"; floor {floor}, must-show "
                 f"{thresholds['crd_epoch_vs_reference']['must_show']}")
    benchmark.extra_info.update(ratio=measured["ratio"], ratio_unstacked=measured["ratio_unstacked"],
                                engine_s=measured["times"]["engine"],
                                engine_unstacked_s=measured["times"]["engine_unstacked"],
                                reference_s=measured["times"]["reference"],
                                reference_phases_s=measured["reference_phases"],
                                engine_phases_s=[{k: v for k, v in r.items() if k.startswith("time/")}
                                                 for r in measured["records"]])
    ctx = measured["ctx"]

    def one_more_engine_epoch():
        with cpu_timing():
            engine_epoch(ctx, 100)
    benchmark.pedantic(one_more_engine_epoch, rounds=1, iterations=1)  # the engine epoch, for the JSON record
    assert measured["ratio"] >= floor, _describe(measured)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="issue 21: the 1.5x goal holds on GPU only (the engine's fewer, larger calls and fused "
                           "losses save launches, syncs and memory passes, which a GPU pays for; on CPU both loops "
                           "pay for the same transformer FLOPs: 0.94x-1.04x measured); on CPU the engine is held "
                           "to the 0.8 floor of test_crd_epoch_engine_vs_reference, measured in the same run")
def test_crd_epoch_must_show_on_gpu(measured, thresholds):
    """issue 8's must-show, asserted where it can hold: reference / engine >= 1.5 on CUDA (same epoch, same rounds as
    the floor test; the real-scale ratio is measured by ``benchmarks/gpu_check.py``)."""
    must = thresholds["crd_epoch_vs_reference"]["must_show"]
    assert measured["ratio"] >= must, _describe(measured)
