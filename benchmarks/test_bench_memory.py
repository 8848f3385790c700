"""Peak memory of a CRD training micro-step (CUDA: max_memory_allocated; CPU: peak resident set of the block,
``benchmarks/memory.py``). Recorded in ``extra_info``; the check is relative: a larger batch needs more."""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import torch_kernels
from benchmarks.memory import peak_memory
from benchmarks.steps import make_step


def measure_peaks(benchmark, model, sizes, latent_shape, warm_up) -> dict:
    """Peak memory of one CRD micro-step per batch size in ``sizes`` (after a warm-up step where ``warm_up(batch)``);
    recorded in ``benchmark.extra_info``; returns ``{batch: peak_memory record}``."""
    peaks = {}
    for batch in sizes:
        step = make_step("crd", model, batch, latent_shape)
        if warm_up(batch):
            step()  # warm-up: allocator pools, lazy init
        for p in model.adapters.trainable_parameters():
            p.grad = None
        with peak_memory() as m:
            step()
        peaks[batch] = m
    benchmark.pedantic(step, rounds=1, iterations=1)
    benchmark.extra_info.update({f"batch{b}_{k}": v for b, m in peaks.items() for k, v in m.items()})
    return peaks


def test_peak_memory_crd_microstep(benchmark):
    from benchmarks.scale_models import build_testbed
    model = build_testbed(device="cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    # CUDA: exact, resettable max_memory_allocated, so each batch is warmed up first. CPU: peak RSS, and glibc keeps
    # freed pages, so a warmed-up step shows no growth: warm up only the small batch (lazy init, pools) and measure a
    # much larger one cold, whose working set must exceed what the small one left behind.
    sizes = (2, 6) if cuda else (2, 48)
    with torch_kernels():
        peaks = measure_peaks(benchmark, model, sizes, (3, 32, 32), lambda batch: cuda or batch == sizes[0])
    growth = {b: m["peak_bytes"] - m["base_bytes"] for b, m in peaks.items()}
    assert growth[sizes[1]] > growth[sizes[0]] >= 0, peaks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real-scale peak memory needs a CUDA GPU (SD3.5-M size in "
                                                          "bf16); no GPU on this machine")
def test_peak_memory_crd_microstep_sd35_medium_512(benchmark):
    """max_memory_allocated of a CRD micro-step at SD3.5-M size, bf16, 512 px, LoRA r32, batch 1 and 4."""
    from benchmarks.scale_models import build_sd35_medium
    model = build_sd35_medium()
    peaks = measure_peaks(benchmark, model, (1, 4), (16, 64, 64), lambda batch: True)
    assert peaks[4]["peak_bytes"] > peaks[1]["peak_bytes"] > 0, peaks
