"""Ahead-of-time compilation of every fused kernel for Hopper (sm_90a) and Ampere (sm_80), on a machine with no GPU.

The interpreter that runs the kernels in CPU CI cannot see what the GPU compiler sees (types, unsupported ops,
register pressure), so this module compiles each kernel as the GPU would run it and reads ``ptxas -v``:

1. **Capture.** Each Triton module named in :data:`kernels.dispatch._TRITON_MODULES` declares the hook
   ``aot_exercise(rows, d, dtype, device)``: it runs every launcher of the module once (forward and backward) on
   ``[rows, d]`` inputs. Here it is called with ``meta`` tensors (no data, no memory) while each ``@triton.jit``
   kernel of the module has its launch replaced by a recorder, over a sweep of sizes (:func:`sizes`) and every
   dtype the fused path accepts (:data:`DTYPES`, or the module's ``AOT_DTYPES``). So the matrix is whatever the
   launchers' own geometry code (:func:`kernels.triton_common.launch`, or a module's own) chooses: no copy to drift.
2. **Specialise.** Each recorded launch goes through Triton's own binder and ``_pack_args`` for the target, exactly as
   ``JITFunction.run`` does at run time: argument types, ``tt.divisibility`` 16 and ``== 1`` constexpr
   specialisations, constexprs, ``num_warps``/``num_stages``. Distinct results are the compile jobs. Pointers are
   taken as 16-byte aligned (meta tensors have address 0; torch's CUDA allocations are 512-byte aligned; a view at
   an odd offset compiles an unvectorised variant that is not in the matrix).
3. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))``, then ``ptxas -v`` (the
   one bundled with triton, with Triton's own flags) on the PTX: registers, spill stores/loads, stack; shared memory
   is Triton's dynamic allocation (``metadata.shared``; these kernels declare no static shared memory). Triton's
   runtime reads ``n_regs``/``n_spills`` only when it loads the cubin on a GPU, hence ``ptxas -v``.

Results are cached under ``$RLFLOW_CACHE/aot`` (default ``~/.cache/rlflow``) by a hash of the kernel's source (with
its dependencies, Triton's ``cache_key``), the job's specialisation and options, the target, and the triton and ptxas
versions: an unchanged kernel is not recompiled, an edited one always is. Jobs run in parallel processes.

Must run in a process where ``TRITON_INTERPRET`` is unset (``triton.jit`` picks the interpreter at import time):
``python -m kernels.aot`` (``--table`` prints the README table, ``--no-cache`` recompiles everything).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable

import torch

TARGETS = {"sm_90a": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32)}
# the dtypes the fused path takes (float64 goes to the torch reference: kernels.dispatch.resolve_backend)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# per SM, both targets: 64K 32-bit registers, at most 64 resident warps and 32 resident blocks; shared memory per SM
# (the most a block may use is 1 KB less on both: the per-block system reservation)
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SHARED = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024}
BLOCK_RESERVED_SHARED = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
# a bandwidth-bound kernel needs many loads in flight: the suite fails a kernel with fewer resident warps than this
MIN_RESIDENT_WARPS = 32


def sizes() -> list[tuple[int, int]]:
    """``(rows, d)`` pairs that reach every value a size-driven geometry choice can return.

    ``d``: every power of two up to 2^24 (a 16-channel 1024x1024 latent) and one less (not a multiple of 16:
    Triton's other specialisation of ``D``); ``rows``: one (also the row-independent geometry of a log-prob) and as
    many as the programs wanted (one chunk per row). Geometry functions round sizes to powers of two, so these land
    on every geometry they choose (the suite checks that STEPS 1..16 all appear).
    """
    ds = sorted({1, 2, 3} | {2 ** k for k in range(2, 25)} | {2 ** k - 1 for k in range(3, 25)})
    return [(r, d) for r in (1, 2048) for d in ds]


@dataclasses.dataclass(frozen=True)
class Job:
    """One compilation: what ``JITFunction.run`` would hand ``triton.compile`` for one launch on one target."""
    module: str
    kernel: str
    target: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], object], ...]
    attrs: tuple[tuple[tuple[int, ...], str], ...]  # JSON of each argument's attributes (hashable)
    options: tuple[tuple[str, object], ...]
    dtype: str  # the latent dtype the launch came from (for the table)

    @property
    def block(self) -> int:
        return self._const("BLOCK")

    @property
    def steps(self) -> int:
        return self._const("STEPS")

    @property
    def num_warps(self) -> int:
        return dict(self.options)["num_warps"]

    def _const(self, name: str):
        names = [n for n, _ in self.signature]
        return dict(self.constexprs).get((names.index(name),)) if name in names else None

    def variant(self) -> str:
        """Everything but the geometry, e.g. ``HAS_REF=True D%16``: other constexprs, Triton's ``== 1`` and
        ``tt.divisibility`` 16 specialisations of integer arguments."""
        names = [n for n, _ in self.signature]
        parts = [f"{names[path[0]]}={value}" for path, value in self.constexprs
                 if names[path[0]] not in ("BLOCK", "STEPS")]
        for path, attr in self.attrs:
            name = names[path[0]]
            if "tt.divisibility" in attr and not dict(self.signature)[name].startswith("*"):
                parts.append(f"{name}%16")
        return " ".join(parts)


def kernel_modules() -> dict[str, object]:
    """Every Triton module the dispatcher knows, imported (for the compiler: fails under the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.aot needs a process without TRITON_INTERPRET=1: triton.jit picks the interpreter "
                           "at import time (run `env -u TRITON_INTERPRET python -m kernels.aot`).")
    from kernels import dispatch
    return {name: importlib.import_module(path) for name, path in sorted(dispatch._TRITON_MODULES.items())}


def jit_kernels(module) -> dict[str, object]:
    from triton.runtime.jit import JITFunction
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}


def capture(modules: dict[str, object] | None = None, size_list: Iterable[tuple[int, int]] | None = None
            ) -> list[Job]:
    """Run every module's ``aot_exercise`` over the sweep on meta tensors; return the distinct compile jobs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    modules = kernel_modules() if modules is None else modules
    size_list = sizes() if size_list is None else list(size_list)
    backends = {t: make_backend(GPUTarget(*spec)) for t, spec in TARGETS.items()}
    jobs: dict[Job, None] = {}
    for module in modules.values():
        exercise = getattr(module, "aot_exercise", None)
        if exercise is None:
            raise RuntimeError(f"{module.__name__} defines no aot_exercise(rows, d, dtype, device) hook: every "
                               f"Triton module must declare one so kernels.aot compiles its kernels.")
        kernels = jit_kernels(module)
        binders = {(k, t): create_function_from_signature(fn.signature, fn.params, be)
                   for k, fn in kernels.items() for t, be in backends.items()}
        launched, packed = set(), set()
        current: dict[str, str] = {}

        def recorder(kname, fn):
            def run(*args, grid, warmup, **kwargs):
                # the prologue of JITFunction.run, then its binder and _pack_args, for each target
                kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
                kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
                launched.add(kname)
                for t, be in backends.items():
                    bound, spec, opts = binders[(kname, t)](*args, **kwargs)
                    memo = (kname, t, repr(spec), repr(sorted(kwargs.items())), current["dtype"])
                    if memo in packed:  # same specialisation as an earlier launch: _pack_args is the slow part
                        continue
                    packed.add(memo)
                    options, signature, constexprs, attrs = fn._pack_args(be, kwargs, bound, spec, opts)
                    job = Job(module.__name__, kname, t, tuple(signature.items()),
                              tuple(sorted((k, _plain(v)) for k, v in constexprs.items())),
                              tuple(sorted((k, json.dumps(v)) for k, v in attrs.items())),
                              tuple(sorted(options.__dict__.items())), current["dtype"])
                    jobs.setdefault(job)
                return None
            return run

        for kname, fn in kernels.items():
            fn.run = recorder(kname, fn)  # instance attribute: JITFunction.__getitem__ calls self.run
        try:
            for dtype in getattr(module, "AOT_DTYPES", DTYPES):
                current["dtype"] = str(dtype).replace("torch.", "")
                for rows, d in size_list:
                    exercise(rows, d, dtype, "meta")
        finally:
            for fn in kernels.values():
                del fn.run
        missing = sorted(set(kernels) - launched)
        if missing:
            raise RuntimeError(f"{module.__name__}.aot_exercise never launches {', '.join(missing)}: the hook must run "
                               f"every kernel of the module.")
    # a launch of the same kernel from several dtypes' sweeps may coincide (e.g. fp32-only side inputs): keep one
    seen, unique = set(), []
    for job in jobs:
        key = dataclasses.replace(job, dtype="")
        if key not in seen:
            seen.add(key)
            unique.append(job)
    return unique


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def capture_cached(use_cache: bool = True) -> list[Job]:
    """:func:`capture`, cached by the text of every ``kernels/*.py`` (launchers, hooks, geometry, this file) and the
    triton and torch versions: the matrix is recomputed whenever any of them changes."""
    import triton
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(json.dumps([triton.__version__, torch.__version__, sizes()]).encode())
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    path = os.path.join(cache_dir(), f"capture-{h.hexdigest()}.json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return [Job(**{k: _tuples(v) for k, v in job.items()}) for job in json.load(f)]
    jobs = capture()
    _write_json(path, [dataclasses.asdict(j) for j in jobs])
    return jobs


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # atomic: parallel runs never read half a file


def _plain(v):
    return v.value if hasattr(v, "value") else v


def _ptxas(target: str):
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(TARGETS[target][1]).path


@functools.lru_cache(maxsize=None)
def _ptxas_version(target: str) -> str:
    out = subprocess.run([_ptxas(target), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def cache_key(job: Job) -> str:
    import triton
    module = importlib.import_module(job.module)
    fn = getattr(module, job.kernel)
    # with how the figures are made (the compile and ptxas code below): editing it invalidates them
    text = json.dumps([triton.__version__, _ptxas_version(job.target), fn.cache_key, _recipe(),
                       dataclasses.astuple(dataclasses.replace(job, dtype=""))], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _recipe() -> str:
    import inspect
    text = "".join(inspect.getsource(f) for f in (compile_job, parse_ptxas)) + repr(_PTXAS_RE)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_dir() -> str:
    return os.path.join(os.environ.get("RLFLOW_CACHE", os.path.expanduser("~/.cache/rlflow")), "aot")


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict[str, int]:
    out = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None and name != "static_smem":
            raise RuntimeError(f"ptxas -v printed no '{name}' figure:\n{log}")
        out[name] = int(m.group(1)) if m else 0
    return out


def compile_job(job: Job) -> dict:
    """Compile one job and read ``ptxas -v``; ``{"error": ...}`` instead of raising, so one failure names itself."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        fn = getattr(importlib.import_module(job.module), job.kernel)
        src = ASTSource(fn, dict(job.signature), dict(job.constexprs),
                        {k: json.loads(v) for k, v in job.attrs})
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=GPUTarget(*TARGETS[job.target]), options=dict(job.options))
        seconds = time.perf_counter() - t0
        arch = f"sm_{TARGETS[job.target][1]}{'a' if TARGETS[job.target][1] >= 90 else ''}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            # Triton's own ptxas flags (backends/nvidia/compiler.py make_cubin), so the figures are its cubin's
            fmad = [] if dict(job.options).get("enable_fp_fusion", True) else ["--fmad=false"]
            cmd = [_ptxas(job.target), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                   ptx, "-o", os.path.join(tmp, "k.o")]
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            return {"error": f"ptxas failed ({res.returncode}): {res.stderr.strip()}"}
        out = parse_ptxas(res.stderr + res.stdout)
        out.update(shared=int(compiled.metadata.shared), compile_s=round(seconds, 3))
        return out
    except Exception as e:  # noqa: BLE001 - reported per job, with the kernel's name, by the caller
        return {"error": f"{type(e).__name__}: {e}"}


def _compile_cached(job: Job, use_cache: bool) -> dict:
    path = os.path.join(cache_dir(), cache_key(job) + ".json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f), cached=True)
    out = compile_job(job)
    if "error" not in out:  # failures are never cached: the next run retries them
        _write_json(path, out)
    return dict(out, cached=False)


def _worker_init():
    # each worker compiles serially; several workers share the cores
    torch.set_num_threads(1)


def compile_all(jobs: list[Job], *, workers: int | None = None, use_cache: bool = True) -> list[tuple[Job, dict]]:
    """Compile every job (cached, in ``workers`` processes; default: one per CPU) -> ``[(job, result)]``."""
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as triton_cache:
        # Triton's own cache would keep a copy of every cubin; ours keeps only the figures
        os.environ["TRITON_CACHE_DIR"] = triton_cache
        try:
            if workers == 1:
                return [(job, _compile_cached(job, use_cache)) for job in jobs]
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                return list(zip(jobs, pool.map(_compile_cached, jobs, [use_cache] * len(jobs), chunksize=4)))
        finally:
            if before is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def resident_warps(registers: int, warps_per_block: int, shared: int, target: str) -> int:
    """Warps resident per SM (the CUDA occupancy calculator's rules: registers, warps, blocks, shared memory)."""
    per_warp = math.ceil(registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks = min(SM_MAX_BLOCKS, SM_MAX_WARPS // warps_per_block, SM_REGISTERS // (per_warp * warps_per_block))
    if shared:
        blocks = min(blocks, SM_SHARED[target] // (shared + BLOCK_RESERVED_SHARED))
    return blocks * warps_per_block


def failures(results: list[tuple[Job, dict]]) -> list[str]:
    """One line per compile error, spill, or occupancy below :data:`MIN_RESIDENT_WARPS`."""
    bad = []
    for job, r in results:
        name = f"{job.kernel} {job.target} {job.dtype} BLOCK={job.block} STEPS={job.steps} warps={job.num_warps} " \
               f"{job.variant()}".rstrip()
        if "error" in r:
            bad.append(f"{name}: compile error: {r['error']}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{name}: register spills ({r['spill_stores']} B stores, {r['spill_loads']} B loads)")
        warps = resident_warps(r["registers"], job.num_warps, r["shared"], job.target)
        if warps < MIN_RESIDENT_WARPS:
            bad.append(f"{name}: {r['registers']} registers -> {warps} resident warps per SM "
                       f"(< {MIN_RESIDENT_WARPS})")
    return bad


def table(results: list[tuple[Job, dict]]) -> str:
    """Markdown, one row per kernel and dtype: its geometries, and over them and every specialisation the register
    range, the most spill bytes and shared memory, and the fewest resident warps per SM, for both targets."""
    rows: dict[tuple, list] = {}
    for job, r in results:
        if "error" not in r:
            rows.setdefault((job.module.rsplit("_", 1)[-1], job.kernel, job.dtype), []).append((job, r))
    head = "| module | kernel | dtype | BLOCK x warps | STEPS | variants |"
    rule = "|---|---|---|---|---|---:|"
    for target in TARGETS:
        head += f" {target} regs | spills B | smem B | warps/SM |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    order = {str(d).replace("torch.", ""): i for i, d in enumerate(DTYPES)}
    for key in sorted(rows, key=lambda k: (k[0], k[1], order.get(k[2], 9))):
        entries = rows[key]
        shapes = sorted({f"{j.block} x {j.num_warps}" for j, _ in entries})
        steps = sorted({j.steps for j, _ in entries})
        cells = [*key, ", ".join(shapes), f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0]),
                 str(len(entries) // len(TARGETS))]
        for target in TARGETS:
            mine = [(j, r) for j, r in entries if j.target == target]
            regs = [r["registers"] for _, r in mine]
            cells += [f"{min(regs)}-{max(regs)}" if min(regs) != max(regs) else str(regs[0]),
                      str(max(r["spill_stores"] + r["spill_loads"] for _, r in mine)),
                      str(max(r["shared"] for _, r in mine)),
                      str(min(resident_warps(r["registers"], j.num_warps, r["shared"], target) for j, r in mine))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(*, workers: int | None = None, use_cache: bool = True) -> tuple[list[tuple[Job, dict]], dict]:
    t0 = time.perf_counter()
    jobs = capture_cached(use_cache)
    t1 = time.perf_counter()
    results = compile_all(jobs, workers=workers, use_cache=use_cache)
    t2 = time.perf_counter()
    import triton
    info = {"jobs": len(jobs), "capture_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "cached": sum(bool(r.get("cached")) for _, r in results), "triton": triton.__version__,
            "ptxas": _ptxas_version("sm_90a"), "kernels": sorted({f"{j.module}.{j.kernel}" for j in jobs})}
    return results, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write every job's figures to this file")
    p.add_argument("--table", action="store_true", help="print the markdown table of benchmarks/README.md")
    p.add_argument("--no-cache", action="store_true", help="recompile every job (results are still stored)")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    args = p.parse_args(argv)
    results, info = run(workers=args.workers, use_cache=not args.no_cache)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": [dict(dataclasses.asdict(j), variant=j.variant(), block=j.block,
                                                      steps=j.steps, num_warps=j.num_warps, **r)
                                                 for j, r in results]}, f, default=str)
    if args.table:
        print(table(results))
    bad = failures(results)
    print(json.dumps(info), file=sys.stderr)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
