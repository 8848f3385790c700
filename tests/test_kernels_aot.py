"""Ahead-of-time compilation (kernels/aot.py): every fused kernel, at every geometry its launcher can choose and every
dtype it takes, compiles for Hopper (sm_90a) and Ampere (sm_80) with no register spill.

The interpreter that runs the kernels in the rest of the suite never calls the GPU compiler, so it cannot catch a type
error, an op the backend lacks, or register pressure; this does, with no GPU. ``triton.jit`` chooses the interpreter
at import time and this process has ``TRITON_INTERPRET=1``, so the compilation runs in a subprocess without it.
Figures are cached by kernel source under ``$RLFLOW_CACHE/aot`` (a compile error is never cached). The first run
compiles every variant (840 on 2026-12-03: ~125 s of CPU time, ~65 s on 2 free cores, 3-4 min on a shared
machine); later runs read the cache (~15 s).
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from triton.runtime.interpreter import InterpretedFunction

from kernels import aot, dispatch, triton_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_compiler(args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=compiler_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = run_compiler(["-m", "kernels.aot", "--json", str(out)])
    data = json.loads(out.read_text()) if out.exists() else None
    return proc, data


def dispatched_kernels():
    """Every @triton.jit kernel of every module the dispatcher knows, listed here (under the interpreter)."""
    names = set()
    for path in dispatch._TRITON_MODULES.values():
        module = importlib.import_module(path)
        names |= {f"{path}.{n}" for n, obj in vars(module).items() if isinstance(obj, InterpretedFunction)}
    return names


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(matrix):
    proc, data = matrix
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = data["results"]
    assert all("error" not in r for r in results)
    expected = dispatched_kernels()
    assert expected and set(data["info"]["kernels"]) == expected
    all_steps = {2 ** k for k in range(triton_common.CUDA_MAX_STEPS.bit_length())}
    for kernel in sorted(expected):
        mine = [r for r in results if f"{r['module']}.{r['kernel']}" == kernel]
        assert {r["target"] for r in mine} == set(aot.TARGETS), kernel
        assert {r["dtype"] for r in mine} == {"float32", "bfloat16", "float16"}, kernel
        # the sweep reaches every STEPS the launcher can choose, in aligned and unaligned D
        assert {r["steps"] for r in mine} == all_steps, kernel
        assert {"D%16" in r["variant"] for r in mine} == {True, False}, kernel
    for r in results:
        name = f"{r['kernel']} {r['target']} {r['dtype']} STEPS={r['steps']} {r['variant']}"
        assert r["registers"] > 0, name
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, name
        # registers low enough for a bandwidth-bound kernel: at least half the SM's warps resident
        warps = aot.resident_warps(r["registers"], r["num_warps"], r["shared"], r["target"])
        assert warps >= aot.MIN_RESIDENT_WARPS, f"{name}: {r['registers']} registers, {warps} warps per SM"


BROKEN = '''
import torch
import triton
import triton.language as tl


@triton.jit
def good_kernel(x_ptr, out_ptr, D, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < D) * 2, mask=offs < D)


@triton.jit
def spilling_kernel(x_ptr, out_ptr, D, BLOCK: tl.constexpr):
    # 16 live fp32 accumulators of BLOCK / 32 = 32 elements per thread: 512 values, beyond 255 registers
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < D, other=0.0)
    a0 = x * 1.0; a1 = x * 2.0; a2 = x * 3.0; a3 = x * 4.0; a4 = x * 5.0; a5 = x * 6.0; a6 = x * 7.0; a7 = x * 8.0
    b0 = tl.sqrt(x + 1); b1 = tl.sqrt(x + 2); b2 = tl.sqrt(x + 3); b3 = tl.sqrt(x + 4)
    b4 = tl.exp(x); b5 = tl.exp(x + 1); b6 = tl.exp(x + 2); b7 = tl.exp(x + 3)
    for k in range(1, D):
        y = tl.load(x_ptr + k * BLOCK + offs)
        a0 += y * a7; a1 += y * a6; a2 += y * a5; a3 += y * a4; a4 += y * a3; a5 += y * a2; a6 += y * a1
        a7 += y * a0; b0 += y * b7; b1 += y * b6; b2 += y * b5; b3 += y * b4; b4 += y * b3; b5 += y * b2
        b6 += y * b1; b7 += y * b0
    tl.store(out_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + b0 + b1 + b2 + b3 + b4 + b5 + b6 + b7)


@triton.jit
def type_error_kernel(x_ptr, out_ptr, D, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK).to(tl.float32)  # a float offset: a type error for the compiler
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


AOT_DTYPES = (torch.float32,)  # a module may narrow the dtypes


def aot_exercise(rows, d, dtype, device):
    x = torch.empty(rows * d, dtype=dtype, device=device)
    good_kernel[(1,)](x, x, d, BLOCK=128, num_warps=4)
    spilling_kernel[(1,)](x, x, d, BLOCK=1024, num_warps=1)
    type_error_kernel[(1,)](x, x, d, BLOCK=128, num_warps=4)
'''

CHECK = '''
import json, sys, types
sys.path.insert(0, sys.argv[1])
import aot_probe_kernels as m
from kernels import aot

jobs = aot.capture({"probe": m}, [(1, 33)])
results = aot.compile_all(jobs, workers=1, use_cache=False)
out = {"jobs": {j.kernel + " " + j.target: r for j, r in results}, "failures": aot.failures(results)}
hookless = types.ModuleType("hookless")
hookless.good_kernel = m.good_kernel
lazy = types.ModuleType("lazy")
lazy.good_kernel, lazy.spilling_kernel = m.good_kernel, m.spilling_kernel
lazy.aot_exercise = lambda rows, d, dtype, device: None
for name, mod in (("hookless", hookless), ("lazy", lazy)):
    try:
        aot.capture({name: mod}, [(1, 33)])
        out[name] = None
    except RuntimeError as e:
        out[name] = str(e)
print(json.dumps(out))
'''


def test_compile_errors_spills_and_missing_hooks_are_caught(tmp_path):
    (tmp_path / "aot_probe_kernels.py").write_text(BROKEN)
    proc = run_compiler(["-c", textwrap.dedent(CHECK), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    jobs = out["jobs"]
    assert len(jobs) == 3 * len(aot.TARGETS)  # 3 kernels, fp32 only (the module's AOT_DTYPES)
    for target in aot.TARGETS:
        good, spill, bad = (jobs[f"{k} {target}"] for k in ("good_kernel", "spilling_kernel", "type_error_kernel"))
        assert "error" not in good and good["spill_stores"] == good["spill_loads"] == 0
        assert spill["spill_stores"] > 0 and spill["spill_loads"] > 0
        assert "error" in bad
    fails = out["failures"]
    assert any(f.startswith("spilling_kernel") and "register spills" in f for f in fails)
    assert any(f.startswith("type_error_kernel") and "compile error" in f for f in fails)
    assert not any(f.startswith("good_kernel") for f in fails)
    assert "defines no aot_exercise" in out["hookless"]
    assert "never launches good_kernel, spilling_kernel" in out["lazy"]


def test_occupancy_follows_the_cuda_rules():
    # registers are allocated per warp in units of 256: 110 regs -> 3584 per warp -> 18 warps, 4 blocks of 4
    assert aot.resident_warps(110, 4, 16, "sm_90a") == 16
    assert aot.resident_warps(64, 8, 32, "sm_90a") == 32
    assert aot.resident_warps(65, 8, 32, "sm_90a") == 24   # 72 per thread allocated: 28 warps, 3 blocks of 8
    assert aot.resident_warps(32, 8, 0, "sm_80") == 64     # the 64-warp limit
    assert aot.resident_warps(16, 1, 0, "sm_90a") == 32    # the 32-block limit
    assert aot.resident_warps(32, 8, 50 * 1024, "sm_80") == 24   # 164 KB per SM / 51 KB per block: 3 blocks
    assert aot.resident_warps(32, 8, 50 * 1024, "sm_90a") == 32  # 228 KB per SM: 4 blocks


def test_capture_refuses_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.kernel_modules()
