"""The prepared GPU check (issue 21): every GPU figure the benchmarks want, measured in one command of under 8 minutes
on one H100/H200, written into ``benchmarks/README.md`` (between the ``gpu-check`` markers) and a JSON file.

Run it on the device machine from the repository root (diffusers, deepspeed and nvtx are not preinstalled there; their
wheels, and those of their missing dependencies, travel in ``.whl/``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site; PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check \\
      --out $OUT/gpu_check.json

``.whl/`` (ignored by git, so rebuilt where it is missing) holds, for the image's Python 3.12: diffusers 0.42.1,
importlib_metadata 10.2.0, lazy-importer 0.1.0, deepspeed 0.19.8 (PyPI has only its sdist: ``DS_BUILD_OPS=0 pip wheel
--no-deps --no-build-isolation deepspeed==0.19.8``, a pure-Python wheel), hjson 3.1.0, pydantic 2.14.3, pydantic_core
2.50.4, annotated_types 0.8.0, typing_inspection 0.4.5, typing_extensions 4.16.0 and nvtx 0.2.16, each from
``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION``.
Without them the script still runs: each section that needs a missing package is skipped with one line saying so.

The README copy on the device machine does not come back: the JSON (and ``gpu_check.md``, the table alone, beside it)
does; ``python -m benchmarks.gpu_check --from-json PATH`` then writes its rows into this checkout's README.
``--dry-run`` runs every section on CPU at tiny widths (about a minute), writing into a temporary copy of the README
unless ``--readme`` names one: ``tests/test_gpu_check_dryrun.py`` runs it so that the GPU run cannot fail for a trivial
reason (imports, shapes, dtypes, table writing).

Sections, in order, each with a time budget and all under one total deadline (``--deadline``, default 400 s of the
8 minutes, leaving the wheel install and the imports their share); what a budget or the deadline cuts off is listed
as skipped, with the reason, in the table and the JSON. A row still running 45 s after the deadline (a compile that
outlasts its estimate) ends the run: a watchdog writes what was measured, names that row, and exits with status 3.

- ``kernels``: each fused loss kernel (training micro-step of the loss: forward + ``dL/dv``; ``fdfo_pairs`` one
  call) vs its eager torch reference vs ``torch.compile`` of that reference (``benchmarks/test_bench_kernels.py``'s
  cases and ideal byte counts), bf16, at a bandwidth-bound size (batch 64 x 16x128x128) and at the 512 px micro-batch
  the micro-steps use (batch 4 x 16x64x64, launch-bound; no ``torch.compile`` there, to keep the budget): effective
  GB/s = ideal bytes / median time, against the device's HBM figure (H100 SXM 3.35 TB/s, H200 4.8 TB/s, by name).
- ``microsteps``: SD3.5-Medium-sized transformer (published widths and depth, random weights, bf16, LoRA r32 on the
  attention projections), 512 px, batch 4: the CRD, NFT and FDFO micro-steps of ``benchmarks/steps.py``, GRPO's
  (:func:`grpo_step`, its defaults: CFG policy pair, KL reference pair) when ``engine.methods`` registers it, and
  the FLUX-sized block stack's CRD step; MFU = analytic training FLOPs (``benchmarks/flops.py``, 3x forward) /
  time / dense bf16 peak; peak memory (``torch.cuda.max_memory_allocated``) of each.
- ``rollout``: 8 images x 10 Euler steps with the sampler adapter at 512 px: images/s, MFU, peak memory.
- ``epoch``: the engine's CRD epoch (``engine.loop.run_epoch`` through DeepSpeed) vs the reference loop
  (``benchmarks/reference_loop.py``) on the SD3.5-M-sized transformer (:class:`RandomSD3`: published transformer, text
  encoders of the published output widths but 1-2 layers, a small VAE of the real factor 8), 512 px, bf16, LoRA r32,
  P=1 x G=4, 4 rollout steps, K=2, interleaved rounds: the ratio issue 8 wants >= 1.5x on GPU. Needs deepspeed.
  ``--with-compile`` adds the engine with ``train.compile=true`` (opt-in: minutes of compiles at this size).

No threshold is asserted here (``pytest benchmarks/`` asserts on CUDA); the exit status is 1 when a section raised
(its error is in the table; the other sections still run), 3 after a hard stop.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "benchmarks", "README.md")
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
#: HBM bandwidth of the devices the check is sized for, bytes/s (vendor figures), matched by name
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 SXM": 3.35e12, "A100": 2.0e12}
#: seconds per section on the GPU (each also stops at the total deadline); the dry run has no binding budget
BUDGET_S = {"kernels": 150, "microsteps": 100, "rollout": 40, "epoch": 140}
SECTIONS = tuple(BUDGET_S)
#: the dry run's default deadline: it checks that every path runs, so only a hang should end it
DRY_RUN_DEADLINE_S = 3600.0
#: a row still running this long after the deadline ends the run: what was measured is written, exit status 3
HARD_STOP_GRACE_S = 45.0


def hbm_bytes_per_s(device_name: str) -> float | None:
    """The HBM bandwidth of a CUDA device by name (None when unknown: then GB/s only, no fraction)."""
    from benchmarks.flops import device_kind
    return HBM_BYTES_PER_S.get(device_kind(device_name))


class Skip(Exception):
    """A row or section that cannot run here (missing package, budget): recorded with its reason, not an error."""


class Clock:
    """The total deadline and the current section's budget."""

    def __init__(self, total_s: float) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + total_s
        self.section_end = self.deadline
        self.current = "start-up"  # the row running now, for the hard stop's message

    def start_section(self, budget_s: float) -> None:
        self.section_end = min(time.perf_counter() + budget_s, self.deadline)

    def left(self) -> float:
        return self.section_end - time.perf_counter()

    def check(self, what: str, need_s: float = 0.0) -> None:
        """Raise :class:`Skip` when less than ``need_s`` of the section's budget (or of the total) is left."""
        self.current = what
        left = self.left()
        if left < need_s:
            total = self.deadline - time.perf_counter()
            why = "the total deadline" if total <= left + 1e-9 else "its section's budget"
            raise Skip(f"{what}: skipped, {max(left, 0):.0f} s left of {why} (needs about {need_s:.0f} s)")


# ------------------------------------------------------------------------------------------------------ context
class Check:
    """What every section shares: the device, the mode (GPU or tiny CPU dry run), the results being collected."""

    def __init__(self, dry_run: bool, clock: Clock, run_dir: str, with_compile: bool = False) -> None:
        import torch
        self.torch = torch
        self.dry_run = dry_run
        self.with_compile = with_compile
        self.clock = clock
        self.run_dir = run_dir
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16
        self.device_name = torch.cuda.get_device_name(0) if self.cuda else _cpu_name()
        self.results: dict = {s: [] for s in SECTIONS}
        self.results.update(skipped=[], errors=[])
        self._models: dict = {}

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def median_time(self, fn, reps: int, warmup: int = 1) -> float:
        """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (device synchronised around each)."""
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def kernel_time(self, fn) -> float:
        """Median seconds of a short kernel call: ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed
        between calls), a few timed calls on CPU."""
        if self.cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        return self.median_time(fn, reps=2)

    def peak(self):
        from benchmarks.memory import peak_memory
        return peak_memory()

    def model(self, key: str, build):
        """Models are built once and shared by the sections (micro-steps and rollout use the same one)."""
        if key not in self._models:
            self._models[key] = build()
        return self._models[key]

    def drop_models(self) -> None:
        self._models.clear()
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def skip(self, section: str, reason: str) -> None:
        print(f"[gpu_check] {section}: {reason}", flush=True)
        self.results["skipped"].append({"section": section, "reason": reason})


def _cpu_name() -> str:
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.machine()} ({os.cpu_count()} cores)"


def need(module: str, what: str) -> None:
    """Skip ``what`` with one clear line when an optional package is not installed (the GPU image lacks diffusers,
    deepspeed and nvtx unless their wheels were installed from ``.whl/``)."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{what}: skipped, the '{module}' package is not installed (carry its wheel in .whl/ and "
                   f"install it first: see the top of benchmarks/gpu_check.py)")


# ---------------------------------------------------------------------------------------------- model presets
#: the sizes each mode runs at: the published SD3.5-M / FLUX widths on GPU, tiny widths in the CPU dry run
def presets(dry_run: bool) -> dict:
    if dry_run:
        from benchmarks.test_scale_models import FLUX_TINY, SD3_TINY
        return dict(sd3_label="tiny SD3", flux_label="tiny FLUX", sd3=SD3_TINY, flux=FLUX_TINY, sd3_shape=(16, 8, 8),
                    flux_shape=(16, 64), text_tokens=7, batch=4, flux_batch=2, lora_rank=4, resolution=64,
                    rollout_n=2, rollout_steps=2,
                    kernel_cases=[(4, (4, 8, 8), True), (2, (4, 4, 4), False)], reps=2, epoch_rounds=1)
    from benchmarks.scale_models import flux_stack_config
    from models.tiny import sd35_medium_config
    return dict(sd3_label="SD3.5-M-sized", flux_label="FLUX-sized 1+8 blocks", sd3=sd35_medium_config(),
                flux=flux_stack_config(), sd3_shape=(16, 64, 64), flux_shape=(1024, 64),
                text_tokens=None, batch=4, flux_batch=2, lora_rank=32, resolution=512, rollout_n=8, rollout_steps=10,
                kernel_cases=[(64, (16, 128, 128), True), (4, (16, 64, 64), False)], reps=5, epoch_rounds=2)


# ------------------------------------------------------------------------------------------------------ kernels
def section_kernels(c: Check) -> None:
    import torch
    try:
        from benchmarks.test_bench_kernels import KERNELS, make_case
    except ImportError as e:  # the kernel cases live in a pytest module
        raise Skip(f"kernels: skipped, benchmarks/test_bench_kernels.py cannot be imported ({e})") from None
    hbm = hbm_bytes_per_s(c.device_name) if c.cuda else None
    cases = presets(c.dry_run)["kernel_cases"]
    # fused and eager first, everywhere (seconds); torch.compile last (tens of seconds per kernel on a GPU), so a
    # budget cut loses compiled rows, never the fused ones
    plan = [(n, shape, kernel, impl) for n, shape, _ in cases for kernel in KERNELS for impl in ("fused", "reference")]
    plan += [(n, shape, kernel, "compiled") for n, shape, with_compile in cases if with_compile for kernel in KERNELS]
    eager: dict = {}
    for i, (n, shape, kernel, impl) in enumerate(plan):
        what = f"{kernel} {impl} {n}x{'x'.join(map(str, shape))}"
        try:  # compiling costs far more than timing: ask for more time before it
            c.clock.check(what, need_s=40 if (impl == "compiled" and c.cuda) else 2)
        except Skip as s:  # the rest of the plan needs at least as much: one line for all of it
            c.skip("kernels", f"{s} (and the {len(plan) - i - 1} kernel rows after it)")
            break
        # "cuda:0", not "cuda": make_case then leaves out its per-call torch.cuda.synchronize (it syncs only for the
        # exact string "cuda"), which do_bench's CUDA events make redundant and which would add a host round trip
        # to every call of a kernel that takes microseconds at the micro-batch size
        dev = "cuda:0" if c.cuda else "cpu"
        with _compile_backend(None if c.cuda else "eager"):  # the dry run traces only: inductor is not what it checks
            case = make_case(kernel, impl, n, shape, c.dtype, dev)
        case.run()  # compile / autotune / first-call allocations outside the timing
        t = c.kernel_time(case.run)
        gbps = case.ideal_bytes / t / 1e9
        row = dict(kernel=kernel, impl=impl, batch=n, shape=list(shape), dtype="bfloat16", ms=1e3 * t,
                   ideal_bytes=case.ideal_bytes, gbps=gbps, hbm_fraction=(gbps * 1e9 / hbm) if hbm else None)
        key = (kernel, n, tuple(shape))
        if impl == "reference":
            eager[key] = t
        elif key in eager:
            row["speedup_vs_eager"] = eager[key] / t
        c.results["kernels"].append(row)
        print(f"[gpu_check] kernels: {what}: {1e3 * t:.3f} ms, {gbps:.3g} GB/s", flush=True)
        del case
    for r in c.results["kernels"]:  # fused rows were timed before their eager reference
        key = (r["kernel"], r["batch"], tuple(r["shape"]))
        if r["impl"] == "fused" and key in eager:
            r["speedup_vs_eager"] = eager[key] / (r["ms"] / 1e3)
    if c.cuda:
        torch.cuda.empty_cache()


class _compile_backend:
    """``torch.compile(fn)`` with ``backend=...`` while building the cases (``make_case`` compiles with the default
    backend): the CPU dry run traces the references with dynamo's ``eager`` backend, because inductor's C++ codegen
    would take minutes on the CPU machine and is not what runs on the GPU anyway. ``None``: unchanged."""

    def __init__(self, backend: str | None) -> None:
        self.backend = backend

    def __enter__(self):
        import torch
        self._orig = torch.compile
        if self.backend is not None:
            orig, backend = self._orig, self.backend
            torch.compile = lambda fn=None, **kw: orig(fn, **{"backend": backend, **kw})
        return self

    def __exit__(self, *exc):
        import torch
        torch.compile = self._orig


# --------------------------------------------------------------------------------------------------- micro-steps
def _sd3(c: Check):
    p = presets(c.dry_run)

    def build():
        from benchmarks.scale_models import make_transformer_flow
        return make_transformer_flow("sd3", p["sd3"], device=c.device, dtype=c.dtype, lora_rank=p["lora_rank"],
                                     text_tokens=p["text_tokens"])
    return c.model("sd3", build)


def _flux(c: Check):
    p = presets(c.dry_run)

    def build():
        from benchmarks.scale_models import make_transformer_flow
        return make_transformer_flow("flux", p["flux"], device=c.device, dtype=c.dtype, lora_rank=p["lora_rank"],
                                     text_tokens=p["text_tokens"])
    return c.model("flux", build)


def micro_methods() -> tuple[list[str], str | None]:
    """The micro-step methods to time: CRD, NFT, FDFO, and GRPO when ``engine.methods`` registers it (checked at run
    time: ``--method grpo`` is being added); else the line saying why there is no GRPO row."""
    from engine.methods import METHODS
    methods = ["crd", "nft", "fdfo"]
    if "grpo" not in METHODS:
        return methods, "grpo: not registered in engine.methods (no `--method grpo`): no GRPO row"
    return methods + ["grpo"], None


def make_micro_step(method: str, model, batch: int, shape: tuple):
    """``benchmarks.steps.make_step`` for the methods it builds; GRPO's micro-step here until it does."""
    from benchmarks import steps
    if method in steps.METHODS:
        return steps.make_step(method, model, batch, shape)
    if method == "grpo":
        return grpo_step(model, batch, shape)
    raise ValueError(f"no micro-step for method {method!r}")


def forwards(method: str) -> float:
    """Forward-pass units of a micro-step: ``steps.forwards_per_step`` for the methods steps.py builds; GRPO here:
    with its default CFG the policy forward is a cond/null pair with backward (2 x 3) plus the KL reference pair
    (2)."""
    from benchmarks import steps
    if method in steps.METHODS:
        return steps.forwards_per_step(method)
    from engine.methods.grpo.config import GRPOConfig
    o = GRPOConfig()
    rows = 2 if o.cfg_scale != 1.0 else 1
    return 3 * rows + (rows if o.kl_beta > 0 else 0)


def grpo_step(model, batch: int, shape: tuple, seed: int = 0):
    """One Flow-GRPO micro-step as ``engine/methods/grpo/update.py`` runs it with the method's defaults: the CFG
    policy velocity (``velocity_for``), the KL reference pass with the pretrained weights, the PPO-clipped
    ``kernels.grpo_loss`` and the backward, on one SDE transition per sample (``sigma -> sigma - 0.1``) whose
    ``lp_old`` the policy itself gave (as the rollout stores it)."""
    import torch

    import kernels
    from benchmarks.steps import _cond, _draw
    from engine.methods.grpo.config import GRPOConfig
    from engine.methods.grpo.rollout import velocity_for
    from kernels.reference import grpo_coefficients

    o = GRPOConfig()
    x0, eps, sigma, dev = _draw(model, batch, shape, seed)
    cond = _cond(model, batch)
    s = sigma.reshape(-1, *([1] * len(shape))).to(x0.dtype)
    x_t = (1 - s) * x0 + s * eps
    coef = grpo_coefficients(sigma.float(), (sigma - 0.1).clamp_min(0.0).float(), noise_level=o.noise_level,
                             sde_type=o.sde_type)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    col = lambda i: coef[:, i].reshape(-1, *([1] * len(shape))).to(x0.dtype)  # noqa: E731
    with torch.no_grad():
        v_roll = velocity_for(model, x_t, sigma, cond, o.cfg_scale, "policy")
        x_next = col(0) * x_t + col(1) * v_roll + col(2) * torch.randn(x_t.shape, generator=g).to(dev, x_t.dtype)
        lp_old = kernels.grpo_logprob(v_roll, x_t, x_next, coef)
    adv = torch.randn(batch, generator=g).clamp(-o.adv_clip, o.adv_clip).to(dev)

    def step():
        v = velocity_for(model, x_t, sigma, cond, o.cfg_scale, "policy", o.detach_uncond)
        v_ref = None
        if o.kl_beta > 0:
            with torch.no_grad():
                v_ref = velocity_for(model, x_t, sigma, cond, o.cfg_scale, "pretrained")
        loss, _ = kernels.grpo_loss(v, x_t, x_next, lp_old, adv, coef, v_ref=v_ref, clip_range=o.clip_range,
                                    adv_clip=o.adv_clip, kl_beta=o.kl_beta)
        loss.backward()
        return loss.detach()
    return step


def section_microsteps(c: Check) -> None:
    need("diffusers", "microsteps")
    from benchmarks.flops import flux_forward_flops, peak_flops, sd3_forward_flops
    p = presets(c.dry_run)
    peak = peak_flops(c.device_name) if c.cuda else None
    methods, note = micro_methods()
    if note:
        c.skip("microsteps", note)
    c.clock.check("microsteps: SD3.5-M model", need_s=15)
    model = _sd3(c)
    h, w = p["sd3_shape"][1:]
    cases = [("sd3", m, p["batch"], p["sd3_shape"]) for m in methods] + [("flux", "crd", p["flux_batch"],
                                                                         p["flux_shape"])]
    for family, method, batch, shape in cases:
        what = f"{family} {method} micro-step"
        try:
            c.clock.check(what, need_s=15)
            if family == "flux":
                model = _flux(c)
            with c.peak() as mem:
                step = make_micro_step(method, model, batch, shape)
                t = c.median_time(step, reps=p["reps"], warmup=2)
        except Skip as s:
            c.skip("microsteps", str(s))
            continue
        fpf = forwards(method)
        if family == "sd3":
            flops = sd3_forward_flops(p["sd3"], batch, h, w, model.text_tokens) * fpf
        else:
            flops = flux_forward_flops(p["flux"], batch, shape[0], model.text_tokens) * fpf
        achieved = flops / t
        c.results["microsteps"].append(dict(
            model=p["sd3_label"] if family == "sd3" else p["flux_label"], method=method, batch=batch,
            shape=list(shape), ms=1e3 * t, flops_per_step=flops, tflops=achieved / 1e12,
            mfu=(achieved / peak) if peak else None, peak_bytes=mem["peak_bytes"], memory_kind=mem["kind"],
            base_bytes=mem.get("base_bytes", 0)))
        print(f"[gpu_check] microsteps: {what}: {1e3 * t:.1f} ms, {achieved / 1e12:.2f} TFLOP/s", flush=True)
        model.zero_grad(set_to_none=True)
    c._models.pop("flux", None)  # the rollout uses the SD3 model only
    gc.collect()


# ----------------------------------------------------------------------------------------------------- rollout
def section_rollout(c: Check) -> None:
    need("diffusers", "rollout")
    from benchmarks.flops import peak_flops, sd3_forward_flops
    from benchmarks.scale_models import rollout_call
    p = presets(c.dry_run)
    c.clock.check("rollout", need_s=10)
    model = _sd3(c)
    n, steps = p["rollout_n"], p["rollout_steps"]
    run = rollout_call(model, n, p["sd3_shape"], steps)
    with c.peak() as mem:
        t = c.median_time(run, reps=2 if c.cuda else 1, warmup=1)
        x0 = run()
    if not bool(c.torch.isfinite(x0).all()):
        raise RuntimeError("rollout: the sampled latents are not finite")
    h, w = p["sd3_shape"][1:]
    flops = sd3_forward_flops(p["sd3"], n, h, w, model.text_tokens) * steps
    peak = peak_flops(c.device_name) if c.cuda else None
    c.results["rollout"].append(dict(model=p["sd3_label"], images=n, steps=steps, seconds=t, images_per_s=n / t,
                                     tflops=flops / t / 1e12, mfu=(flops / t / peak) if peak else None,
                                     peak_bytes=mem["peak_bytes"], memory_kind=mem["kind"]))
    print(f"[gpu_check] rollout: {n} images x {steps} steps in {t:.2f} s ({n / t:.2f} images/s)", flush=True)
    c.drop_models()


# ------------------------------------------------------------------------------------------------------- epoch
#: ``model.size`` presets of :class:`RandomSD3` (``{preset: NAME}``)
SD3_PRESETS = {
    # transformer config, (CLIP-L width, CLIP-G width), T5 width, (CLIP length, T5 length), VAE block channels
    "sd35_medium": dict(transformer="sd35_medium", clip=(768, 1280), t5=4096, lengths=(77, 256),
                        vae=(8, 8, 8, 8)),
    "tiny": dict(transformer="tiny", clip=(8, 16), t5=32, lengths=(8, 8), vae=(8, 8, 8, 8)),
}


def _load_sd3_family():
    from models.sd3 import SD3Model

    class RandomSD3(SD3Model):
        """SD3 with random weights built in memory (no model directory): the transformer of a preset (SD3.5-M's
        published config, or the tiny test config), CLIP-L/G and T5 encoders with the published OUTPUT widths but
        1-3 layers (so the transformer sees SD3.5-M's text shapes: 77 + 256 tokens of width 4096, pooled 2048), and a
        small KL VAE with the real spatial factor 8 (4 blocks of 8 channels). The family contract (``load``) makes it
        usable from a config: ``model: {family: benchmarks.gpu_check:RandomSD3, size: {preset: sd35_medium}}``, so
        the engine and the reference loop build it exactly as they build a loaded SD3.5-M."""

        @classmethod
        def load(cls, model_cfg, *, dtype=None, seed: int = 0):
            import torch
            from diffusers import AutoencoderKL, SD3Transformer2DModel
            from transformers import CLIPTextModelWithProjection

            from models.sd3 import TextEncoders
            from models.tiny import (SD3_VAE_SCALE, SD3_VAE_SHIFT, _clip_config, _t5_encoder, clip_tokenizer,
                                     sd35_medium_config, t5_tokenizer)

            name = (model_cfg.size or {}).get("preset", "sd35_medium")
            if name not in SD3_PRESETS:
                from engine.errors import ConfigError
                raise ConfigError(f"config key 'model.size.preset': {name!r} is not one of {sorted(SD3_PRESETS)}")
            pr = SD3_PRESETS[name]
            dtype = dtype or torch.float32
            cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
            device = torch.device("cuda") if cuda else torch.device("cpu")
            torch.manual_seed(seed)
            if pr["transformer"] == "sd35_medium":
                tcfg = sd35_medium_config()
            else:
                from benchmarks.test_scale_models import SD3_TINY
                tcfg = SD3_TINY
            if "num_layers" in (model_cfg.size or {}):  # the preset's widths at another depth (realscale_cpu)
                tcfg = {**tcfg, "num_layers": int(model_cfg.size["num_layers"])}
            with device:  # random init where it runs (2.5B parameters initialise in seconds on a GPU)
                transformer = SD3Transformer2DModel(**tcfg).to(dtype)
            clip_len, t5_len = pr["lengths"]
            toks = {"text_encoder": clip_tokenizer(clip_len), "text_encoder_2": clip_tokenizer(clip_len),
                    "text_encoder_3": t5_tokenizer(t5_len)}
            encoders = {
                "text_encoder": CLIPTextModelWithProjection(_clip_config(toks["text_encoder"], pr["clip"][0], 1,
                                                                         pr["clip"][0])),
                "text_encoder_2": CLIPTextModelWithProjection(_clip_config(toks["text_encoder_2"], pr["clip"][1], 1,
                                                                           pr["clip"][1])),
                "text_encoder_3": _t5_encoder(toks["text_encoder_3"], pr["t5"]),
            }
            encoders = {k: v.to(dtype) for k, v in encoders.items()}
            ch = pr["vae"]
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
                                up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch,
                                layers_per_block=1, latent_channels=tcfg["in_channels"], norm_num_groups=2,
                                sample_size=64, scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT,
                                use_quant_conv=False, use_post_quant_conv=False).to(dtype)
            text = TextEncoders(encoders, toks, device)
            model = cls(transformer, vae, {"shift": 3.0}, text, max_sequence_length=t5_len,
                        resolution=model_cfg.resolution)
            return model.to(device)

    return RandomSD3


def __getattr__(name: str):
    """``benchmarks.gpu_check:RandomSD3`` for configs, built on first use (so importing this module needs neither
    diffusers nor the models package)."""
    if name == "RandomSD3":
        cls = _load_sd3_family()
        globals()["RandomSD3"] = cls
        return cls
    raise AttributeError(name)


def epoch_overrides(c: Check, run_dir: str) -> list[str]:
    from benchmarks.common import crd_overrides
    p = presets(c.dry_run)
    return crd_overrides(run_dir, reward="bench_toy", **{
        "data.prompts_per_epoch": 1, "train.gradient_steps_per_epoch": 1, "rollout.batch_size": 4,
        "model.family": "benchmarks.gpu_check:RandomSD3",
        "model.size": "{preset: %s}" % ("tiny" if c.dry_run else "sd35_medium"),
        "model.resolution": p["resolution"], "model.lora_rank": p["lora_rank"], "model.lora_targets": "[]",
        "model.dtype": "bf16", "train.dtype": "bf16"})


def section_epoch(c: Check) -> None:
    need("diffusers", "epoch")
    need("deepspeed", "epoch (the engine trains through DeepSpeed)")
    from benchmarks.common import (build_engine, engine_epoch, interleaved_times, load_crd_config,
                                   ratio_of_minima, thresholds)
    from benchmarks.reference_loop import build_reference, reference_crd_epoch
    c.clock.check("epoch", need_s=40)
    p = presets(c.dry_run)
    cfg = load_crd_config(epoch_overrides(c, os.path.join(c.run_dir, "epoch")))
    ctx = build_engine(cfg)
    ref = build_reference(cfg)
    with c.peak() as mem_engine:
        engine_epoch(ctx, 0)  # warm-up (first-call allocations, autotuning)
    with c.peak() as mem_ref:
        reference_crd_epoch(ref, 0)
    ref.seconds.clear()
    rounds = p["epoch_rounds"]
    c.clock.check("epoch: timed rounds", need_s=5)
    times = interleaved_times({"engine": lambda r: engine_epoch(ctx, r + 1),
                               "reference": lambda r: reference_crd_epoch(ref, r + 1)}, rounds)
    ratio = ratio_of_minima(times["reference"], times["engine"])
    must = thresholds()["crd_epoch_vs_reference"]["must_show"]
    c.results["epoch"].append(dict(
        model=p["sd3_label"], resolution=p["resolution"], samples=4,
        rollout_steps=cfg.rollout.num_steps, K=cfg.train.num_timesteps, rounds=rounds,
        engine_s=min(times["engine"]), reference_s=min(times["reference"]), ratio=ratio, must_show=must,
        clock="CUDA wall time" if c.cuda else "CPU process time, 1 torch thread",
        engine_peak_bytes=mem_engine["peak_bytes"], reference_peak_bytes=mem_ref["peak_bytes"],
        memory_kind=mem_engine["kind"], reference_phases_s={k: v / rounds for k, v in ref.seconds.items()}))
    print(f"[gpu_check] epoch: engine {min(times['engine']):.2f} s, reference {min(times['reference']):.2f} s "
          f"-> {ratio:.2f}x (goal {must}x)", flush=True)
    _close(ctx)
    del ctx
    gc.collect()
    if c.with_compile:
        _epoch_compiled(c, c.results["epoch"][-1], min(times["reference"]), rounds)
    del ref
    c.drop_models()


def _close(ctx) -> None:
    if hasattr(ctx.rewards, "close"):
        ctx.rewards.close()
    ctx.logger.close()


def _epoch_compiled(c: Check, row: dict, reference_s: float, rounds: int) -> None:
    """``--with-compile``: the same engine epoch with ``train.compile=true``, its first epoch (all compiles) timed
    apart, then ``rounds`` epochs against the reference loop's fastest round of the same run. Opt-in: at SD3.5-M
    size every (adapter, grad mode) graph is a full inductor compile of a 24-block transformer, minutes in all, more
    than the 8-minute check has; run it as a second command with ``--sections epoch --with-compile --deadline 540``.
    In the dry run the networks are compiled with dynamo's ``eager`` backend (tracing and guards, no codegen)."""
    from benchmarks.common import build_engine, engine_epoch, load_crd_config
    from engine.config import TrainConfig
    if "compile" not in TrainConfig.__dataclass_fields__:
        raise Skip("epoch (train.compile): skipped, engine.config has no train.compile option")
    c.clock.check("epoch: engine with train.compile=true", need_s=240 if c.cuda else 10)
    cfg = load_crd_config(epoch_overrides(c, os.path.join(c.run_dir, "epoch_compiled")) + ["train.compile=true"])
    with _compile_backend(None if c.cuda else "eager"):
        ctx = build_engine(cfg)
    c.sync()
    t = time.perf_counter()
    engine_epoch(ctx, 0)  # every compile happens here (the option recompiles only in the first epoch)
    c.sync()
    warm = time.perf_counter() - t
    ts = []
    for r in range(rounds):
        t = time.perf_counter()
        engine_epoch(ctx, r + 1)
        c.sync()
        ts.append(time.perf_counter() - t)
    _close(ctx)
    clock = "CUDA wall time" if c.cuda else "wall time"  # the reference's CPU figure is process time: dry run only
    row.update(engine_compiled_s=min(ts), ratio_compiled=reference_s / min(ts), compile_first_epoch_s=warm,
               compiled_clock=clock)
    print(f"[gpu_check] epoch: engine with train.compile {min(ts):.2f} s (first epoch {warm:.1f} s) -> "
          f"{reference_s / min(ts):.2f}x", flush=True)


RUNNERS = {"kernels": section_kernels, "microsteps": section_microsteps, "rollout": section_rollout,
           "epoch": section_epoch}


# -------------------------------------------------------------------------------------------------- the table
def meta(c: Check) -> dict:
    import torch

    from benchmarks.flops import peak_flops
    from benchmarks.report import versions
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    hbm = hbm_bytes_per_s(c.device_name) if c.cuda else None
    return dict(device=c.device_name, dry_run=c.dry_run,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, triton=triton_v, cuda=torch.version.cuda if c.cuda else None,
                versions=versions(), hbm_tb_s=hbm / 1e12 if hbm else None,
                peak_bf16_tflops=(peak_flops(c.device_name) or 0) / 1e12 if c.cuda else None)


def _f(x, fmt: str, none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _gib(b) -> str:
    return _f(None if b is None else b / 2**30, ".2f")


def render(res: dict) -> str:
    m = res["meta"]
    mode = ("**CPU dry run at tiny widths** (checks that every path runs; no figure here means anything)"
            if m["dry_run"] else "GPU run")
    lines = [BEGIN, "", f"Written by `python -m benchmarks.gpu_check` on {m['date']}: {mode}.", "",
             f"- Device: {m['device']}" + (f" (HBM {m['hbm_tb_s']} TB/s, dense bf16 peak {m['peak_bf16_tflops']:.0f} "
                                          f"TFLOP/s)" if m.get("hbm_tb_s") else "") + ".",
             f"- Versions: torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda'] or 'n/a (CPU)'}; all: "
             f"{m['versions']}.",
             f"- Took {res.get('seconds', float('nan')):.0f} s (deadline {res.get('deadline_s', 'n/a')} s).", ""]
    if res["kernels"]:
        lines += ["Fused loss kernels (bf16; training micro-step of each loss, `fdfo_pairs` one call; GB/s = ideal "
                  "bytes / median time):", "",
                  "| kernel | impl | batch x latent | ms | GB/s | of HBM | vs eager |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in res["kernels"]:
            lines.append(f"| {r['kernel']} | {r['impl']} | {r['batch']} x {'x'.join(map(str, r['shape']))} | "
                         f"{r['ms']:.3f} | {r['gbps']:.3g} | {_f(r['hbm_fraction'] and 100 * r['hbm_fraction'], '.0f')}"
                         f"{'%' if r['hbm_fraction'] else ''} | {_f(r.get('speedup_vs_eager'), '.2f')}"
                         f"{'x' if r.get('speedup_vs_eager') else ''} |")
        lines.append("")
    if res["microsteps"]:
        lines += ["Training micro-steps (forwards + loss + backward, LoRA, bf16; MFU from the analytic FLOPs, 3x "
                  "forward, an overstatement with a frozen base; peak memory: the most allocated during the step, "
                  "the resident weights included):", "",
                  "| model | method | batch | ms | TFLOP/s | MFU | peak memory (GiB) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["microsteps"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['ms']:.1f} | {r['tflops']:.2f} | "
                         f"{_f(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                         f"{_gib(r['peak_bytes'])} ({r['memory_kind']}) |")
        lines.append("")
    if res["rollout"]:
        lines += ["Rollout (Euler ODE, sampler adapter, no CFG):", "",
                  "| model | images x steps | s | images/s | TFLOP/s | MFU | peak memory (GiB) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["rollout"]:
            lines.append(f"| {r['model']} | {r['images']} x {r['steps']} | {r['seconds']:.3f} | "
                         f"{r['images_per_s']:.2f} | {r['tflops']:.2f} | {_f(r['mfu'] and 100 * r['mfu'], '.1f')}"
                         f"{'%' if r['mfu'] else ''} | {_gib(r['peak_bytes'])} ({r['memory_kind']}) |")
        lines.append("")
    if res["epoch"]:
        lines += ["Engine CRD epoch vs the reference loop (same math and draws; P=1 x G=4, K=2, fastest of the "
                  "interleaved rounds):", "",
                  "| model | engine (s) | reference (s) | reference / engine | goal | peak memory engine / reference "
                  "(GiB) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["epoch"]:
            lines.append(f"| {r['model']}, {r['resolution']} px, {r['rollout_steps']} steps | {r['engine_s']:.3f} | "
                         f"{r['reference_s']:.3f} | {r['ratio']:.2f}x | {r['must_show']}x | "
                         f"{_gib(r['engine_peak_bytes'])} / {_gib(r['reference_peak_bytes'])} ({r['memory_kind']}) |")
            if "engine_compiled_s" in r:
                lines.append(f"| the same, engine with `train.compile=true` | {r['engine_compiled_s']:.3f} | "
                             f"{r['reference_s']:.3f} | {r['ratio_compiled']:.2f}x | {r['must_show']}x | first "
                             f"epoch (compiles) {r['compile_first_epoch_s']:.1f} s |")
        lines.append("")
    for s in res["skipped"]:
        lines.append(f"- Skipped ({s['section']}): {s['reason']}")
    for e in res["errors"]:
        lines.append(f"- **Error** ({e['section']}): {e['error']}")
    lines += ["", END]
    return "\n".join(lines)


def write_table(text: str, path: str) -> None:
    """Replace the text between the markers of ``path`` (append the block at the end when they are absent)."""
    from benchmarks.report import write_section
    write_section(text, path, start=BEGIN, end=END)


def _finite(obj) -> bool:
    """Every number in the results is finite (what the dry-run test checks; NaN would mean a broken measurement)."""
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


# --------------------------------------------------------------------------------------------------------- main
def run(dry_run: bool, deadline_s: float, sections, run_dir: str, *, with_compile: bool = False,
        on_hard_stop=None, grace_s: float = HARD_STOP_GRACE_S) -> dict:
    """Measure ``sections``; ``on_hard_stop(results)`` (when given) is called from a watchdog thread if a row is
    still running ``grace_s`` after the deadline (a compile or a step that outlasts its budget), so the
    figures measured so far are written and the process can end inside the 8 minutes."""
    clock = Clock(deadline_s)
    c = Check(dry_run, clock, run_dir, with_compile=with_compile)
    watchdog = None
    if on_hard_stop is not None:
        import threading

        def hard_stop():
            res = {"meta": meta(c), **{k: list(v) for k, v in c.results.items()},
                   "seconds": time.perf_counter() - clock.t0, "deadline_s": deadline_s}
            res["errors"].append({"section": "all", "error": f"hard stop {grace_s:.0f} s after the deadline: "
                                                             f"{clock.current} was still running"})
            on_hard_stop(res)
        watchdog = threading.Timer(deadline_s + grace_s, hard_stop)
        watchdog.daemon = True
        watchdog.start()
    from benchmarks.common import cpu_timing, register_bench_rewards
    register_bench_rewards()
    # the dry run must reach every row even on a loaded CPU machine (a skipped row would fail its test for a reason
    # that has nothing to do with the code): its section budgets are the whole deadline
    scale = DRY_RUN_DEADLINE_S / min(BUDGET_S.values()) if dry_run else 1.0
    with cpu_timing():  # one torch thread on CPU (the dry run's only figures are its own wall time)
        for name in SECTIONS:
            if name not in sections:
                continue
            clock.start_section(BUDGET_S[name] * scale)
            clock.current = f"section {name}"
            t = time.perf_counter()
            try:
                RUNNERS[name](c)
            except Skip as s:
                c.skip(name, str(s))
            except Exception as e:  # one broken section must not cost the others their figures
                traceback.print_exc()
                c.results["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                c.drop_models()
            print(f"[gpu_check] section {name} took {time.perf_counter() - t:.1f} s", flush=True)
        c.drop_models()
    if watchdog is not None:
        watchdog.cancel()
    res = {"meta": meta(c), **c.results, "seconds": time.perf_counter() - clock.t0, "deadline_s": deadline_s}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The prepared GPU check: kernels, micro-steps, rollout, engine epoch "
                                             "vs reference loop; writes benchmarks/README.md and a JSON file")
    ap.add_argument("--dry-run", action="store_true", help="every section on CPU at tiny widths (about a minute), "
                                                           "into a temporary README copy unless --readme is given")
    ap.add_argument("--out", default="gpu_check.json", help="JSON results (default gpu_check.json); the table "
                                                            "alone goes beside it as <stem>.md")
    ap.add_argument("--readme", default=None, help="the Markdown file to write the rows into (default: "
                                                   "benchmarks/README.md; in a dry run a temporary copy of it)")
    ap.add_argument("--deadline", type=float, default=None, help="total seconds; what is left then is skipped, "
                                                                   "and a row still running 45 s later ends the "
                                                                   "run with what was measured (default 400; a dry "
                                                                   "run: 3600, it checks paths, not time)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--with-compile", action="store_true", help="also time the engine epoch with train.compile=true "
                                                                "(minutes of compiles at SD3.5-M size: run it as a "
                                                                "second command with --sections epoch)")
    ap.add_argument("--from-json", default=None, help="write the rows of an earlier run's JSON into --readme "
                                                      "(e.g. the device machine's) without measuring")
    a = ap.parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: --sections: {bad} are not among {list(SECTIONS)}", file=sys.stderr)
        return 2
    if a.from_json:
        with open(a.from_json) as f:
            res = json.load(f)
        write_table(render(res), a.readme or README)
        print(f"wrote the rows of {a.from_json} into {a.readme or README}")
        return 0

    if a.dry_run:  # before anything imports triton / deepspeed
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if not a.dry_run and (not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        print("error: the GPU check needs a CUDA device with TRITON_INTERPRET unset (use --dry-run on CPU)",
              file=sys.stderr)
        return 2
    readme = a.readme
    if readme is None:
        if a.dry_run:
            readme = os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "README.md")
            shutil.copyfile(README, readme)
        else:
            readme = README
    run_dir = tempfile.mkdtemp(prefix="gpu_check_runs_")

    def write(res: dict) -> str:
        if not _finite({k: v for k, v in res.items() if k != "meta"}):
            res["errors"].append({"section": "all", "error": "a measured figure is not finite (NaN/inf)"})
        text = render(res)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
            f.write(text + "\n")
        write_table(text, readme)
        print(text)
        print(f"[gpu_check] wrote {a.out} and the table into {readme}; {len(res['errors'])} error(s), "
              f"{len(res['skipped'])} skip(s), {res['seconds']:.0f} s", flush=True)
        return text

    def hard_stop(res: dict) -> None:
        write(res)
        shutil.rmtree(run_dir, ignore_errors=True)
        os._exit(3)  # the row still running cannot be interrupted from here

    try:
        if a.deadline is None:  # a dry run on a loaded CI machine must reach every row: no time limit binds
            a.deadline = DRY_RUN_DEADLINE_S if a.dry_run else 400.0
        res = run(a.dry_run, a.deadline, sections, run_dir, with_compile=a.with_compile, on_hard_stop=hard_stop)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    write(res)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
