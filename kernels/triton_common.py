"""Launch geometry shared by the fused kernels: a 2-D grid (row, chunk of D) and a two-stage row reduction.

Each program handles ``CHUNK = BLOCK * STEPS`` consecutive elements of one row, accumulating in fp32 registers, and
writes its partial sums to a small ``[rows, chunks, k]`` buffer; torch then sums over chunks. The two-stage
reduction (rather than atomics) is deterministic, so identical inputs give bit-identical sums: this is what makes
the CRD log-ratio exactly 0 and the FDFO ratio exactly 1 on-policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kernels.dispatch import interpreter_enabled

# CUDA: enough programs to fill the SMs several times over (the kernels are bandwidth-bound). One vector of 512
# elements over 8 warps, for every D: 2 elements per thread (fp32: one 8-byte load per input and step). At 8 per thread
# (BLOCK 1024 over 4 warps, the first geometry) ptxas gave the five-sum forward kernels 91-118 registers, 16-20
# resident warps per SM; at 2 per thread every kernel needs <= 54 on sm_90a and sm_80, >= 32 of 64 warps resident
# (benchmarks/README.md, "Ahead-of-time compilation"; at 4 per thread, 64-68 registers, 24 warps), and 32 warps x 32
# threads x 5 loads x 8 B keeps 40 KB per SM in flight, more than HBM latency x bandwidth per SM asks (~25 KB on
# H200). A fixed BLOCK (a short row only masks lanes) leaves 5 geometries (STEPS 1..16) to compile and check ahead of
# time (kernels/aot.py). The interpreter's geometry below is separate, so CPU results do not depend on this choice.
CUDA_BLOCK = 512
CUDA_WARPS = 8
CUDA_TARGET_PROGRAMS = 2048
CUDA_MAX_STEPS = 16
# Interpreter: every program and loop step costs Python time, so use few, wide programs (one chunk per row).
INTERP_MAX_BLOCK = 4096
INTERP_MAX_STEPS = 8


@dataclass(frozen=True)
class Launch:
    block: int   # elements per vector step (power of two, constexpr)
    steps: int   # vector steps per program (constexpr)
    chunks: int  # programs per row
    num_warps: int

    @property
    def chunk(self) -> int:
        return self.block * self.steps


def launch(rows: int, d: int, *, block: int | None = None, steps: int | None = None) -> Launch:
    """Grid geometry for ``rows`` rows of ``d`` elements (``block``/``steps`` force a geometry, for tests)."""
    interp = interpreter_enabled()
    if block is None:
        block = min(triton.next_power_of_2(d), INTERP_MAX_BLOCK) if interp else CUDA_BLOCK
    if steps is None:
        vectors = triton.cdiv(d, block)
        if interp:
            steps = min(triton.next_power_of_2(vectors), INTERP_MAX_STEPS)
        else:
            wanted_chunks = max(1, triton.cdiv(CUDA_TARGET_PROGRAMS, rows))
            steps = min(triton.next_power_of_2(triton.cdiv(vectors, wanted_chunks)), CUDA_MAX_STEPS)
    # 2 elements per thread, up to 8 warps (a forced block too; the interpreter ignores warps)
    num_warps = max(1, min(CUDA_WARPS, block // 64))
    return Launch(block=block, steps=steps, chunks=triton.cdiv(d, block * steps), num_warps=num_warps)


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """``[N, ...] -> [N, D]`` contiguous (a view for the usual contiguous latents)."""
    return x.reshape(x.shape[0], -1).contiguous()


def partial_buffer(rows: int, geo: Launch, k: int, device: torch.device) -> torch.Tensor:
    return torch.empty((rows, geo.chunks, k), dtype=torch.float32, device=device)


def row_sums(partials: torch.Tensor) -> torch.Tensor:
    """Second reduction stage: ``[rows, chunks, k] -> [rows, k]`` (deterministic)."""
    return partials.sum(dim=1)
