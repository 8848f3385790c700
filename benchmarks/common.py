"""Shared pieces of the benchmarks: configs at testbed scale, the engine's CRD epoch as one call, thresholds, timing.

The engine epoch here is the body of ``engine.loop.train`` (rollout -> decode -> reward -> advantages -> update ->
snapshots -> log), without eval, sample grids and checkpoints, so it can be timed one epoch at a time.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS_FILE = os.path.join(ROOT, "benchmarks", "thresholds.yaml")

#: the testbed model (engine/testbed, models/testbed.py) at its published size, random weights (speed does not
#: depend on the weights; the trained checkpoint has exactly this architecture)
TESTBED_RANDOM = "model.random_init=true"
#: a much smaller MMDiT of the same family, for the equality test (seconds on a loaded CPU)
TINY_SIZE = ("model.size={num_layers: 1, attention_head_dim: 8, num_attention_heads: 2, text_width: 16, "
             "text_intermediate: 32, text_layers: 1, text_heads: 2, sample_size: 8}")


def thresholds() -> dict:
    """The regression thresholds (ratios only), from ``benchmarks/thresholds.yaml``."""
    with open(THRESHOLDS_FILE) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{THRESHOLDS_FILE} must hold a mapping of threshold names to numbers")
    return data


def register_bench_rewards() -> None:
    """``bench_toy``: a deterministic reward that varies per sample (non-degenerate advantages on random weights)."""
    from engine.rewards import register
    register("bench_toy", "benchmarks.common:ToyReward")


class ToyReward:
    """Mean of the red channel minus mean of the blue channel, per image."""

    name = "toy"

    def score(self, images, prompts, metadata):
        return {"toy": (images[:, 0] - images[:, 2]).flatten(1).mean(1).float()}


def crd_overrides(run_dir: str, *, tiny: bool = False, reward: str = "testbed_geneval", **extra) -> list[str]:
    """A CPU-sized CRD run of the testbed recipe: P=2 prompts x G=4, 4 ODE steps, K=2 timesteps, micro-batch 4
    (one group), 2 optimizer steps per epoch; no logging sinks, no eval, no checkpoints; loss kernels on the torch
    backend on CPU (``train.kernel_backend``)."""
    base = {
        "model.random_init": "true", "model.lora_rank": "16",
        "data.train_prompts": os.path.join(ROOT, "data/testbed/train.jsonl"),
        "data.prompts_per_epoch": "2", "data.group_size": "4",
        "rollout.num_steps": "4", "rollout.batch_size": "8",
        "train.micro_batch_size": "4", "train.num_timesteps": "2", "train.gradient_steps_per_epoch": "2",
        "output_dir": run_dir, "log.tensorboard": "false", "log.progress": "false", "log.grid_every": "0",
        "eval.num_prompts": "0", "checkpoint.every": "0", "checkpoint.at_end": "false",
        "rewards": f"[{{name: {reward}}}]",
        # on CPU the torch reference losses: the session's TRITON_INTERPRET=1 would run the fused kernels through
        # the Triton interpreter, correct but slow by design (every program in Python); on CUDA the fused kernels
        "train.kernel_backend": "auto" if torch.cuda.is_available() else "torch",
    }
    if tiny:
        base.update({"model.resolution": "8", "model.lora_rank": "4"})
    base.update({k: str(v) for k, v in extra.items()})
    return ([TINY_SIZE] if tiny else []) + [f"{k}={v}" for k, v in base.items()]


def load_crd_config(overrides: list[str], method: str = "crd"):
    register_bench_rewards()
    from engine.config import load_config
    return load_config(os.path.join(ROOT, f"configs/testbed_{method}.yaml"), overrides, method=method)


@contextlib.contextmanager
def torch_kernels():
    """Make ``kernels``' ``backend="auto"`` pick the torch reference on CPU for the enclosed block (for benchmarks
    that call the kernels directly; engine runs built from :func:`crd_overrides` choose through the config option
    ``train.kernel_backend`` instead).

    The benchmark session runs with ``TRITON_INTERPRET=1`` (for the kernel benchmarks), under which ``auto`` would
    run the fused kernels through the Triton interpreter: correct, but slow by construction (every program in
    Python), so an engine timed that way would measure the interpreter. On CUDA this has no effect.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def build_engine(cfg):
    """``engine.loop.build`` (DeepSpeed engine, adapters, snapshots, rewards, logger) -> Context."""
    from engine.context import build
    ctx, _ = build(cfg)
    return ctx


def engine_epoch(ctx, epoch: int) -> dict:
    """One epoch of ``engine.loop.train`` (``engine.loop.run_epoch``, logged as the loop logs it) -> the epoch record
    (per-phase times and throughputs, ``step_losses``)."""
    from engine.loop import run_epoch

    last, _, steps = run_epoch(ctx, epoch)
    ctx.logger.log(ctx.global_step, last, kind="epoch")
    return {**last, "step_losses": [s.get("loss/mean") for s in steps]}


def interleaved_times(fns: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """Per function, the times of ``fn(round)``, the functions alternating within every round (so load changes on
    a shared machine hit all of them alike; the order alternates between rounds too). On CUDA: wall time with the
    device synchronised. On CPU: process CPU time (see :func:`cpu_timing`); ``out["wall:<name>"]`` has wall times."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    out.update({f"wall:{k}": [] for k in names})
    cuda = torch.cuda.is_available()
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            if cuda:
                torch.cuda.synchronize()
            w, c = time.perf_counter(), time.process_time()
            fns[k](r)
            if cuda:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            out[k].append(wall if cuda else cpu)
            out[f"wall:{k}"].append(wall)
    return out


@contextlib.contextmanager
def cpu_timing():
    """CPU measurements with ONE torch thread. On a shared 2-core machine two OpenMP threads contend with every
    other job (spin-waits, preemption at barriers) and the same epoch took 0.4 s to 40 s of wall time within
    minutes; with one thread the process CPU time of an epoch varies by a few percent under the same load, so
    ratios measured that way are reproducible. No effect on CUDA."""
    if torch.cuda.is_available():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ratio_of_minima(slow: list[float], fast: list[float]) -> float:
    """``min(slow) / min(fast)``: on a shared machine other jobs only ever add time, so the fastest of several
    interleaved rounds is the least disturbed estimate of each."""
    return min(slow) / min(fast)


def device_string() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def params_named(model, adapter: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.adapters.params(adapter).items()}
