"""``train.compile``: the engine's CRD epoch with the network compiled and eager, beside the reference loop, in the
interleaved rounds of one run (the configuration of ``test_bench_epoch.py``: testbed model at its published size,
P=1 x G=4, 4-step rollouts, K=2, one optimizer step; timestep stacking off, so every network call has batch 4 and
the compiled run has no dynamic-shape recompile).

The compiled engine's first epoch compiles its graphs (one per adapter and grad mode: the sampler rollout, the
policy step, the snapshot forwards); it is the warm-up and is reported apart. Later epochs must compile nothing
(asserted: a recompile every epoch would cost more than compiling gains). Process CPU time, one torch thread on CPU;
wall time on CUDA. Reported, not asserted: reference/engine with compile on and off, and eager/compiled.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks.common import (build_engine, cpu_timing, crd_overrides, device_string, engine_epoch,
                               interleaved_times, load_crd_config, ratio_of_minima)
from benchmarks.reference_loop import build_reference, reference_crd_epoch

ROUNDS = 3
SETTINGS = {"data.prompts_per_epoch": 1, "train.gradient_steps_per_epoch": 1, "train.stack_timesteps": "false"}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    cfgs = {on: load_crd_config(crd_overrides(str(tmp_path_factory.mktemp(f"compile_{on}")), **SETTINGS,
                                              **{"train.compile": on})) for on in (False, True)}
    ctx, ctx_c, ref = build_engine(cfgs[False]), build_engine(cfgs[True]), build_reference(cfgs[False])
    graphs = {}
    with cpu_timing():
        engine_epoch(ctx, 0)
        reference_crd_epoch(ref, 0)
        before, t = counters["stats"]["unique_graphs"], time.perf_counter()
        engine_epoch(ctx_c, 0)  # compiles
        graphs["first_epoch"], compile_wall = counters["stats"]["unique_graphs"] - before, time.perf_counter() - t
        before = counters["stats"]["unique_graphs"]
        times = interleaved_times({"engine": lambda r: engine_epoch(ctx, r + 1),
                                   "engine_compiled": lambda r: engine_epoch(ctx_c, r + 1),
                                   "reference": lambda r: reference_crd_epoch(ref, r + 1)}, ROUNDS)
        graphs["later_epochs"] = counters["stats"]["unique_graphs"] - before
    for c in (ctx, ctx_c):
        c.logger.close()
    return {"times": times, "graphs": graphs, "compile_wall_s": compile_wall,
            "ratio": ratio_of_minima(times["reference"], times["engine"]),
            "ratio_compiled": ratio_of_minima(times["reference"], times["engine_compiled"]),
            "speedup": ratio_of_minima(times["engine"], times["engine_compiled"])}


def test_compiled_engine_epoch(benchmark, measured, record_ratio):
    t, g = measured["times"], measured["graphs"]
    clock = "CUDA wall time" if torch.cuda.is_available() else "process CPU time, 1 torch thread"
    text = (f"{device_string()}: engine epoch min eager {min(t['engine']):.2f}s, compiled "
            f"{min(t['engine_compiled']):.2f}s -> eager/compiled = {measured['speedup']:.2f}x; reference "
            f"{min(t['reference']):.2f}s -> reference/engine = {measured['ratio']:.2f}x eager, "
            f"{measured['ratio_compiled']:.2f}x compiled ({ROUNDS} interleaved rounds, {clock}); first compiled "
            f"epoch {measured['compile_wall_s']:.0f}s wall ({g['first_epoch']} graphs), later epochs "
            f"{g['later_epochs']} new graphs")
    record_ratio("train.compile eager/compiled", text)
    benchmark.extra_info.update(**{k: measured[k] for k in ("ratio", "ratio_compiled", "speedup", "compile_wall_s",
                                                            "graphs")}, times=t)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert g["first_epoch"] >= 3, text  # it really compiled (the sampler, policy and snapshot graphs)
    assert g["later_epochs"] == 0, text  # ... once: no recompile in later epochs
