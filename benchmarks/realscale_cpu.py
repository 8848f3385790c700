"""The real-scale path on CPU (issue 21): ``python -m benchmarks.realscale_cpu``.

The SD3.5-Medium transformer at its published width (1536 = 24 heads x 64, text 4096, pooled 2048, dual attention,
QK RMS-norm) with a reduced depth (``--blocks``, default 2), random weights in bf16, LoRA r32 on the attention
projections (the engine's default targets), at a small resolution (default 128 px: 16x16x16 latents, 64 image tokens
+ 333 text tokens). One CRD epoch of one group (P=1 x G, K timesteps) runs through the real entry point
(``engine.train.main`` with ``configs/sd35m_geneval_crd.yaml`` and ``key=value`` overrides; the model family is
``benchmarks.gpu_check:RandomSD3``) on 2 CPU ranks (``DS_ACCELERATOR=cpu``, gloo, one torch thread each) under
ZeRO-2 and ZeRO-3.

Memory (per rank) is the resident set of the process, read from ``/proc/self/status``:

- ``baseline``: ``VmRSS`` after every import, before the run (libraries, interpreter);
- ``states``: ``VmRSS`` at the start of the epoch minus the baseline: what the built engine holds (model states);
- ``peak``: ``VmHWM`` over the epoch (the high-water mark is reset through ``/proc/self/clear_refs`` just before the
  epoch, so the model build's fp32 init transient is not counted) minus the baseline.

glibc's malloc is run with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0`` in the ranks, so a freed
tensor goes back to the OS and the resident set follows the live allocations (with the default dynamic threshold
freed blocks below 32 MB stay in the heap and the RSS keeps every transient). Both figures are compared with
:func:`benchmarks.memory_plan.lora_plan` at the same configuration (exact parameter counts of the run's networks,
built on the meta device), and the plan is cross-checked with DeepSpeed's own estimators
(``estimate_zero3_model_states_mem_needs`` / ``estimate_zero2_model_states_mem_needs``) at the same counts. Prints a
Markdown report (measured vs planned, and the plan extrapolated to the published depth: 24 blocks, and the real
SD3.5-M text encoders) and writes it with the raw figures under ``--out`` (default ``runs/realscale_cpu``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "sd35m_geneval_crd.yaml")
GIB = 2 ** 30
MIB = 2 ** 20
#: published SD3.5-Medium transformer depth, and the real text encoders (CLIP-L, CLIP-G, T5-XXL encoder) and VAE
FULL_DEPTH = 24
#: resident memory a CPU rank gains outside tensors between the baseline and the epoch (imports inside the run,
#: DeepSpeed engine and gloo state): 196 / 207 MiB (ZeRO-2 / ZeRO-3) at the tiny preset, where the tensors are
#: ~0 (2-core AMD EPYC CPU, 2026-12-03); the SD3.5-M-width runs show the same RSS-minus-tensors gap
CPU_RUNTIME_BYTES = 200 * MIB


def run_overrides(run_dir: str, *, stage: int, blocks: int, resolution: int, group: int, steps: int, k: int,
                  preset: str = "sd35_medium", dtype: str = "bf16", lora_rank: int = 32) -> list[str]:
    """The SD3.5-M recipe turned into one CPU epoch of one group: P=1 x G, ``steps`` ODE steps, K timesteps, one
    optimizer step of micro-batch G / 2 per rank, the toy reward, no eval / logging sinks / checkpoints."""
    mb = max(1, group // 2)
    size = "{preset: %s, num_layers: %d}" % (preset, blocks)
    return [
        f"model.family=benchmarks.gpu_check:RandomSD3", f"model.size={size}", f"model.resolution={resolution}",
        f"model.lora_rank={lora_rank}", f"model.lora_alpha={2 * lora_rank}", f"model.dtype={dtype}",
        f"train.dtype={dtype}", f"deepspeed.zero_stage={stage}",
        f"data.train_prompts={os.path.join(ROOT, 'data/testbed/train.jsonl')}", "data.test_prompts=",
        "data.kind=geneval", "data.prompts_per_epoch=1", f"data.group_size={group}",
        f"rollout.num_steps={steps}", f"rollout.batch_size={mb}", "train.epochs=1", f"train.micro_batch_size={mb}",
        "train.gradient_steps_per_epoch=1", f"train.num_timesteps={k}", "train.kernel_backend=torch",
        "rewards=[{name: bench_toy}]", f"output_dir={run_dir}", "log.tensorboard=false", "log.progress=false",
        "log.grid_every=0", "eval.num_prompts=0", "eval.every=0", "checkpoint.every=0", "checkpoint.at_end=false",
    ]


# ------------------------------------------------------------------------------------------------ one rank
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rank_main(overrides: list[str], out_json: str) -> int:
    """One rank (RANK / WORLD_SIZE / MASTER_* set by :func:`launch`): imports, baseline, the run, the figures."""
    import torch
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (imported before the baseline: its import is not the run's memory)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import engine.loop
    import engine.train
    from benchmarks.common import register_bench_rewards
    from benchmarks.gpu_check import RandomSD3  # noqa: F401
    register_bench_rewards()
    rec: dict = {"rank": int(os.environ["RANK"]), "baseline_bytes": _status("VmRSS")}
    real_epoch = engine.loop.run_epoch

    def measured_epoch(ctx, epoch):
        rec["lifetime_hwm_before_epoch_bytes"] = _status("VmHWM")  # includes the model build's init transient
        rec["epoch_start_bytes"] = _status("VmRSS")
        rec["counts"] = live_counts(ctx)
        rec["epoch_start_tensor_bytes"] = live_tensor_bytes()
        _reset_hwm()
        t = time.perf_counter()
        out = real_epoch(ctx, epoch)
        rec["epoch_s"] = time.perf_counter() - t
        rec["epoch_hwm_bytes"] = _status("VmHWM")
        rec["epoch_end_bytes"] = _status("VmRSS")
        rec["metrics"] = {k: v for k, v in out[0].items() if isinstance(v, (int, float))}
        return out

    engine.loop.run_epoch = measured_epoch  # train() calls run_epoch through the module: the loop itself is unchanged
    code = engine.train.main(["--method", "crd", "--config", RECIPE, *overrides])
    rec["exit_code"] = code
    with open(out_json, "w") as f:
        json.dump(rec, f)
    return int(code or 0)


def live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages reachable from Python (every parameter, ZeRO partition, buffer, optimizer
    state, cache): what the run holds as tensors, to separate the plan's items from the allocator's and the runtime's
    share of the resident set."""
    import gc

    import torch
    seen: dict = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                st = obj.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # a tensor subclass without storage (e.g. a functional wrapper)
            continue
    return sum(seen.values())


def live_counts(ctx) -> dict:
    """Element counts of what the run holds, from the live model (ZeRO-3: ``ds_numel`` is the full size)."""
    model = ctx.model

    def n(p):
        return int(getattr(p, "ds_numel", p.numel()))
    tr = model.transformer
    lora = {}
    for name, p in tr.named_parameters():
        if "lora_" in name:
            adapter = name.split(".")[-2]
            lora[adapter] = lora.get(adapter, 0) + n(p)
    return {"transformer_base": sum(n(p) for k, p in tr.named_parameters() if "lora_" not in k),
            "lora": lora, "trainable": sum(n(p) for p in model.parameters() if p.requires_grad),
            "buffers": sum(b.numel() for b in tr.buffers()),
            "text": sum(n(p) for enc in model.text.encoders.values() for p in enc.parameters())
            if hasattr(model.text, "encoders") else None,
            "vae": sum(n(p) for p in model.vae.parameters())}


# ------------------------------------------------------------------------------------------------ launcher
def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: list[str], run_dir: str, world: int = 2, timeout_s: float = 1800) -> list[dict]:
    """``world`` rank processes of this module (``--rank-worker``) on one gloo group; their records."""
    os.makedirs(run_dir, exist_ok=True)
    port = str(_port())
    procs, outs = [], []
    for rank in range(world):
        out = os.path.join(run_dir, f"rank{rank}.json")
        if os.path.exists(out):
            os.remove(out)
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE",)}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536",
                   MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
        log = open(os.path.join(run_dir, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "benchmarks.realscale_cpu", "--rank-worker", out,
                                        "--", *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                      log))
        outs.append(out)
    deadline = time.monotonic() + timeout_s
    codes: dict = {}
    while len(codes) < world:  # a rank that fails would leave its peer blocked in a collective: stop the others
        for rank, (p, _) in enumerate(procs):
            if rank not in codes and p.poll() is not None:
                codes[rank] = p.returncode
        if any(c != 0 for c in codes.values()) or time.monotonic() > deadline:
            for rank, (p, _) in enumerate(procs):
                if rank not in codes:
                    p.kill()
                    codes[rank] = p.wait() if any(c != 0 for c in codes.values()) else "timeout"
            break
        time.sleep(0.2)
    for _, log in procs:
        log.close()
    # the rank that failed on its own first (a killed peer's code is negative)
    failed = sorted((r for r in codes if codes[r] != 0),
                    key=lambda r: (not isinstance(codes[r], int) or codes[r] < 0, r))
    if failed:
        tail = open(os.path.join(run_dir, f"rank{failed[0]}.log")).read()[-3000:]
        raise RuntimeError(f"rank {failed[0]} of the real-scale run failed ({run_dir}):\n{tail}")
    return [json.load(open(o)) for o in outs]


# ---------------------------------------------------------------------------------------------------- plan
def planned(counts: dict, *, stage: int, world: int, micro_batch: int, resolution: int, blocks: int,
            text_tokens: int = 333, dtype_bytes: int = 2, persistence: int = 100000, reduce_bucket: int = 50_000_000,
            device: str = "gpu", runtime_bytes: float = 0.0):
    from benchmarks.memory_plan import lora_plan
    return lora_plan(counts, stage=stage, world=world, micro_batch=micro_batch, resolution=resolution,
                     blocks=blocks, text_tokens=text_tokens, dtype_bytes=dtype_bytes, persistence=persistence,
                     reduce_bucket=reduce_bucket, device=device, runtime_bytes=runtime_bytes)


def deepspeed_estimates(counts: dict, world: int) -> dict:
    """DeepSpeed's own model-state estimators at the same counts (no offload, no zero.Init), per rank. They assume
    every parameter trained with fp16/bf16 mixed-precision Adam (2 + 16 bytes/param); the LoRA run trains only the
    policy adapter, so they are applied to (a) the trainable parameters alone, the part the plan's optimizer and
    gradient lines cover, and (b) the whole network as if fully fine-tuned, against the existing full-fine-tuning
    plan's 2 + 16 bytes/param."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    t, full = counts["trainable"], counts["transformer_base"] + counts["trainable"]
    largest = counts.get("largest_layer", 0)
    z3_t = estimate_zero3_model_states_mem_needs(t, counts.get("largest_trainable_layer", 0), world, 1,
                                                 cpu_offload=False, cpu_offload_params=False, zero_init=False)[1]
    z3_f = estimate_zero3_model_states_mem_needs(full, largest, world, 1, cpu_offload=False,
                                                 cpu_offload_params=False, zero_init=False)[1]
    z2_t = estimate_zero2_model_states_mem_needs(t, world, 1, cpu_offload=False)[1]
    z2_f = estimate_zero2_model_states_mem_needs(full, world, 1, cpu_offload=False)[1]
    return {"zero3_trainable": z3_t, "zero3_full_ft": z3_f, "zero2_trainable": z2_t, "zero2_full_ft": z2_f}


def meta_counts(blocks: int, lora_rank: int = 32, text: str = "random", preset: str = "sd35_medium") -> dict:
    """Element counts of the RandomSD3 ``preset`` transformer (SD3.5-M's published config, or the test's tiny one) at
    ``blocks`` depth with LoRA r on the engine's default targets, built on the meta device (no weights); ``text``:
    the run's own encoders/VAE (``random``: taken from the run, None here) or the published SD3.5-Medium ones
    (``published``: CLIP-L 124M + CLIP-G 695M + T5-XXL encoder 4.76B, VAE 84M)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from benchmarks.gpu_check import SD3_PRESETS
    from models.lora import DEFAULT_TARGET_MODULES
    from models.tiny import sd35_medium_config

    if preset == "sd35_medium":
        cfg = sd35_medium_config()
    else:
        from benchmarks.test_scale_models import SD3_TINY
        cfg = dict(SD3_TINY)
    cfg["num_layers"] = blocks
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**cfg)
    lora, largest = 0, 0
    for name, mod in tr.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t)
                                                    for t in DEFAULT_TARGET_MODULES):
            lora += lora_rank * (mod.in_features + mod.out_features)
            largest = max(largest, lora_rank * max(mod.in_features, mod.out_features))
    base = sum(p.numel() for p in tr.parameters())
    largest_layer = max(p.numel() for p in tr.parameters())
    persistent = sum(p.numel() for p in tr.parameters() if p.numel() <= 100000)
    out = {"transformer_base": base, "lora": {a: lora for a in ("policy", "old", "sampler", "ema")},
           "trainable": lora, "buffers": sum(b.numel() for b in tr.buffers()), "largest_layer": largest_layer,
           "largest_trainable_layer": largest, "base_persistent": persistent, "blocks": blocks,
           "text_tokens": sum(SD3_PRESETS[preset]["lengths"]),
           "width": cfg["num_attention_heads"] * cfg["attention_head_dim"],
           "dual_blocks": sum(1 for i in range(blocks) if i in cfg["dual_attention_layers"])}
    if text == "published":
        out.update(text=123_650_304 + 694_659_840 + 4_762_310_656, vae=83_653_863)
    return out


# ---------------------------------------------------------------------------------------------------- main
def measure(stage: int, *, blocks: int, resolution: int, group: int, steps: int, k: int, out_dir: str,
            preset: str = "sd35_medium", dtype: str = "bf16", lora_rank: int = 32) -> dict:
    run_dir = os.path.join(out_dir, f"zero{stage}_{blocks}blocks")
    ov = run_overrides(os.path.join(run_dir, "run"), stage=stage, blocks=blocks, resolution=resolution,
                       group=group, steps=steps, k=k, preset=preset, dtype=dtype, lora_rank=lora_rank)
    t = time.perf_counter()
    ranks = launch(ov, run_dir)
    wall = time.perf_counter() - t
    return {"stage": stage, "blocks": blocks, "resolution": resolution, "group": group, "steps": steps, "k": k,
            "dtype": dtype, "preset": preset, "wall_s": wall, "ranks": ranks}


def compare(row: dict, counts: dict) -> dict:
    """Plan at the run's configuration vs each rank's measured figures."""
    counts = {**counts, **{k: v for k, v in row["ranks"][0]["counts"].items() if v is not None}}
    mb = max(1, row["group"] // 2)
    plan = planned(counts, stage=row["stage"], world=len(row["ranks"]), micro_batch=mb,
                   resolution=row["resolution"], blocks=row["blocks"], text_tokens=counts["text_tokens"],
                   dtype_bytes=2 if row["dtype"] == "bf16" else 4, device="cpu", runtime_bytes=CPU_RUNTIME_BYTES)
    states = max(r["epoch_start_bytes"] - r["baseline_bytes"] for r in row["ranks"])
    tensors = max(r.get("epoch_start_tensor_bytes", 0) for r in row["ranks"])
    peak = max(r["epoch_hwm_bytes"] - r["baseline_bytes"] for r in row["ranks"])
    return {"plan": plan, "states_bytes": states, "width": counts["width"], "tensor_bytes": tensors, "peak_bytes": peak,
            "states_ratio": states / plan["states_total"], "peak_ratio": peak / plan["total"],
            "ds": deepspeed_estimates(counts, len(row["ranks"]))}


def report(rows: list[dict], cmps: list[dict], full: dict, machine: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    r0 = rows[0]
    lines = [f"Measured {date} on a {machine}, 2 ranks (gloo, 1 torch thread each), {r0['preset']} transformer at "
             f"width {cmps[0]['width']} with {r0['blocks']} blocks, {r0['dtype']}, LoRA r32, {r0['resolution']} px, "
             f"one CRD epoch of P=1 x G={r0['group']}, {r0['steps']} ODE steps, K={r0['k']}. Per rank, MiB (max over "
             "the ranks):", "",
             "| ZeRO | measured states | planned states | ratio | live tensors | measured epoch peak | planned peak "
             "| ratio | epoch s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row, c in zip(rows, cmps):
        lines.append(f"| {row['stage']} | {c['states_bytes'] / MIB:.0f} | {c['plan']['states_total'] / MIB:.0f} | "
                     f"{c['states_ratio']:.2f} | {c['tensor_bytes'] / MIB:.0f} | {c['peak_bytes'] / MIB:.0f} | "
                     f"{c['plan']['total'] / MIB:.0f} | "
                     f"{c['peak_ratio']:.2f} | {max(r['epoch_s'] for r in row['ranks']):.0f} |")
    lines += ["", "Planned lines (MiB per rank):", "",
              "| line | " + " | ".join(f"ZeRO-{r['stage']}" for r in rows) + " |",
              "| --- |" + " ---: |" * len(rows)]
    for key in cmps[0]["plan"]["lines"]:
        lines.append(f"| {key} | " + " | ".join(f"{c['plan']['lines'][key] / MIB:.1f}" for c in cmps) + " |")
    lines += ["", "DeepSpeed's estimators at the same counts (MiB per rank, model states only): "
              + "; ".join(f"ZeRO-{r['stage']} trainable {c['ds']['zero%d_trainable' % r['stage']] / MIB:.1f}, "
                          f"as full fine-tuning {c['ds']['zero%d_full_ft' % r['stage']] / MIB:.0f}"
                          for r, c in zip(rows, cmps)), ""]
    lines += [f"Extrapolated with the plan to the published depth ({FULL_DEPTH} blocks, "
              f"{full['transformer_base'] / 1e9:.2f}B transformer parameters, LoRA r32 "
              f"{full['trainable'] / 1e6:.1f}M per adapter, published text encoders kept on the device), "
              "GiB per GPU:", "",
              "| ZeRO | GPUs | resolution | micro-batch | model states | activations | working set | total | "
              "total, text encoders on the CPU |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stage in (2, 3):
        for gpus in (2, 8):
            for res, mb in ((512, 1), (512, 4), (512, 24), (1024, 1)):
                p = planned(full, stage=stage, world=gpus, micro_batch=mb, resolution=res, blocks=FULL_DEPTH)
                lines.append(f"| {stage} | {gpus} | {res} | {mb} | {p['states_total'] / GIB:.2f} | "
                             f"{p['activations'] / GIB:.2f} | {p['working_set'] / GIB:.2f} | "
                             f"{p['total'] / GIB:.2f} | "
                             f"{(p['total'] - p['lines']['text encoders + VAE (frozen, whole)']) / GIB:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-worker"]:
        rest = argv[2:]
        return rank_main(rest[1:] if rest[:1] == ["--"] else rest, argv[1])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="rollout ODE steps (int(0.99 * steps) eligible for K)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--preset", default="sd35_medium", help="RandomSD3 preset (tiny: the test's seconds-long run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "realscale_cpu"))
    ap.add_argument("--machine", default="2-core AMD EPYC CPU")
    ap.add_argument("--from-results", action="store_true", help="re-render --out/results.json without running")
    a = ap.parse_args(argv)
    if a.from_results:  # re-plan and re-render saved measurements (no run)
        with open(os.path.join(a.out, "results.json")) as f:
            rows = json.load(f)["rows"]
    else:
        rows = [measure(s, blocks=a.blocks, resolution=a.resolution, group=a.group, steps=a.steps, k=a.k,
                        out_dir=a.out, preset=a.preset, dtype=a.dtype) for s in a.stages]
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    counts = meta_counts(rows[0]["blocks"], preset=rows[0]["preset"])
    cmps = [compare(r, counts) for r in rows]
    full = meta_counts(FULL_DEPTH, text="published")
    text = report(rows, cmps, full, a.machine)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "compare": cmps}, f, indent=1, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
