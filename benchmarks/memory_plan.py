"""ZeRO-3 full fine-tuning memory plan for FLUX.1-dev with CRD's four networks: ``python -m benchmarks.memory_plan``.

Parameter counts come from the published configs, instantiated on the ``meta`` device (no weights, no download):
``FluxTransformer2DModel`` (black-forest-labs/FLUX.1-dev ``transformer/config.json``), T5-XXL encoder, CLIP-L text
model, the FLUX VAE. The plan (full fine-tuning, ``model.finetune: full``, ``deepspeed.zero_stage: 3``):

- four transformer copies in bf16: policy theta, theta_old, theta_samp, and the frozen pretrained CFG anchor;
- the policy only has optimizer state: fp32 master weights + AdamW m and v (fp32), plus its bf16 gradients;
- every one of those is partitioned over the N GPUs by ZeRO-3 (frozen copies too, without optimizer state);
- text encoders and VAE: frozen, bf16; prompt embeddings are cached by the engine, so they can live on the CPU
  (``offload_text_encoders``); listed as a separate line, partitioned like the rest when kept on the GPUs;
- ZeRO-3 working set: parameters gathered for the layers in flight (bounded by ``stage3_max_live_parameters``,
  DeepSpeed default 1e9 elements) and the reduce bucket (our ``deepspeed.reduce_bucket_size``, 5e7 elements);
- activations: per sample at the given resolution, with activation checkpointing per transformer block (block inputs
  kept, one block recomputed at a time) and flash/SDPA attention (no N^2 score matrix kept).

Prints a Markdown table (per-GPU GiB for 8 and 16 GPUs) that ``docs/scale.md`` and the README quote.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30
BF16, FP32 = 2, 4


def _meta_count(build) -> int:
    import torch
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def count_parameters(name: str) -> int:
    """Parameters of a published FLUX.1-dev component from its config, built on the meta device."""
    if name == "flux":
        from diffusers import FluxTransformer2DModel
        from benchmarks.scale_models import FLUX_DEV_CONFIG
        return _meta_count(lambda: FluxTransformer2DModel(**FLUX_DEV_CONFIG))
    if name == "t5":  # google/t5-v1_1-xxl encoder (FLUX.1-dev text_encoder_2/config.json)
        from transformers import T5Config, T5EncoderModel
        cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False)
        return _meta_count(lambda: T5EncoderModel(cfg))
    if name == "clip":  # openai/clip-vit-large-patch14 text model (FLUX.1-dev text_encoder/config.json)
        from transformers import CLIPTextConfig, CLIPTextModel
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
        return _meta_count(lambda: CLIPTextModel(cfg))
    if name == "vae":  # FLUX.1-dev vae/config.json
        from diffusers import AutoencoderKL
        return _meta_count(lambda: AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False))
    raise ValueError(f"unknown component {name!r}; known: flux, t5, clip, vae")


@dataclass
class Plan:
    transformer_params: int
    text_params: int
    vae_params: int
    resolution: int = 1024
    micro_batch: int = 1
    text_tokens: int = 512
    max_live_parameters: float = 1e9
    reduce_bucket: float = 5e7

    # ------------------------------------------------------------------------------------- model states (bytes)
    def weights_bf16(self) -> dict[str, float]:
        p = self.transformer_params
        return {"policy weights (bf16)": BF16 * p, "theta_old (bf16)": BF16 * p, "theta_samp (bf16)": BF16 * p,
                "pretrained CFG anchor (bf16)": BF16 * p}

    def optimizer(self) -> dict[str, float]:
        p = self.transformer_params
        return {"policy gradients (bf16)": BF16 * p, "policy fp32 master": FP32 * p,
                "AdamW m + v (fp32)": 2 * FP32 * p}

    def partitioned_total(self) -> float:
        return sum(self.weights_bf16().values()) + sum(self.optimizer().values())

    # ------------------------------------------------------------------------------------ per-GPU, unpartitioned
    def working_set(self) -> float:
        """Gathered bf16 parameters of the layers in flight + the fp32 gradient reduce bucket."""
        return BF16 * self.max_live_parameters + FP32 * self.reduce_bucket

    def activations(self) -> float:
        """Activation memory per micro-batch with per-block checkpointing (bf16): the block inputs of all 57 blocks
        kept, plus one block's full activations during its recompute/backward (~34 * N * d bytes per sample for a
        transformer block with flash attention, Korthikanti et al. 2022, Table 2 without the s^2 term)."""
        from benchmarks.scale_models import FLUX_DEV_CONFIG
        d = FLUX_DEV_CONFIG["num_attention_heads"] * FLUX_DEV_CONFIG["attention_head_dim"]
        blocks = FLUX_DEV_CONFIG["num_layers"] + FLUX_DEV_CONFIG["num_single_layers"]
        n = (self.resolution // 16) ** 2 + self.text_tokens
        kept = blocks * n * d * BF16
        one_block = 34 * n * d
        return self.micro_batch * (kept + one_block)

    def per_gpu(self, gpus: int, text_on_gpu: bool = False) -> dict[str, float]:
        rows = {k: v / gpus for k, v in {**self.weights_bf16(), **self.optimizer()}.items()}
        rows["text encoders + VAE (bf16, frozen)"] = (BF16 * (self.text_params + self.vae_params) / gpus
                                                      if text_on_gpu else 0.0)
        rows["ZeRO-3 working set (gathered layers + bucket)"] = self.working_set()
        rows[f"activations (micro-batch {self.micro_batch}, {self.resolution} px, checkpointed)"] = self.activations()
        return rows


def build_plan(resolution: int = 1024, micro_batch: int = 1) -> Plan:
    return Plan(transformer_params=count_parameters("flux"),
                text_params=count_parameters("t5") + count_parameters("clip"),
                vae_params=count_parameters("vae"), resolution=resolution, micro_batch=micro_batch)


def markdown(plan: Plan, gpus=(8, 16)) -> str:
    head = (f"FLUX.1-dev transformer: {plan.transformer_params / 1e9:.2f}B parameters; text encoders (T5-XXL + "
            f"CLIP-L): {plan.text_params / 1e9:.2f}B; VAE: {plan.vae_params / 1e6:.0f}M (meta-device counts from "
            f"the published configs).\n\n")
    cols = " | ".join(f"{g} GPUs (GiB/GPU)" for g in gpus)
    lines = [f"| item | total (GiB) | {cols} |", "| --- | ---: |" + " ---: |" * len(gpus)]
    tables = {g: plan.per_gpu(g) for g in gpus}
    totals_all = {**plan.weights_bf16(), **plan.optimizer()}
    for key in tables[gpus[0]]:
        total = totals_all.get(key)
        total_txt = f"{total / GIB:.1f}" if total is not None else ("—" if "activations" not in key and
                                                                     "working" not in key else "per GPU")
        if key.startswith("text encoders"):
            total_txt = f"{BF16 * (plan.text_params + plan.vae_params) / GIB:.1f} (CPU: cached embeddings)"
        lines.append(f"| {key} | {total_txt} | " + " | ".join(f"{tables[g][key] / GIB:.2f}" for g in gpus) + " |")
    lines.append(f"| **model states, partitioned (22 bytes/param)** | {plan.partitioned_total() / GIB:.1f} | "
                 + " | ".join(f"**{plan.partitioned_total() / g / GIB:.2f}**" for g in gpus) + " |")
    lines.append("| **total per GPU** | | " + " | ".join(f"**{sum(tables[g].values()) / GIB:.1f}**" for g in gpus)
                 + " |")
    with_text = " / ".join(f"{sum(plan.per_gpu(g, text_on_gpu=True).values()) / GIB:.1f}" for g in gpus)
    return head + "\n".join(lines) + (f"\n\nWith the text encoders and VAE also partitioned on the GPUs instead of "
                                      f"the CPU: {with_text} GiB per GPU ({' / '.join(map(str, gpus))} GPUs).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    a = ap.parse_args(argv)
    print(markdown(build_plan(a.resolution, a.micro_batch), tuple(a.gpus)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------------------- LoRA under ZeRO-2 / ZeRO-3
#: activation bytes kept for backward per token, per hidden unit and per SD3.5-M (MMDiT, dual-attention) block at
#: 2-byte activations, no activation checkpointing: measured by ``benchmarks/realscale_cpu.py`` on 2026-12-03 as the
#: epoch peak's slope over the micro-batch (1 -> 2 samples per rank at 128 px: +83 MiB over 397 tokens x 1536 x 2
#: blocks). Twice the 34 of a plain transformer block (Korthikanti et al. 2022, Table 2, without the s^2 term): two
#: token streams with AdaLN-Zero modulated copies, QK RMS-norm, the second (image-only) attention, LoRA inputs.
ACT_BYTES_SD3_BLOCK = 71


def lora_plan(counts: dict, *, stage: int, world: int, micro_batch: int, resolution: int, blocks: int,
              text_tokens: int = 333, dtype_bytes: int = BF16, persistence: int = 100000,
              reduce_bucket: int = 50_000_000, max_live_parameters: float = 1e9, patch: int = 2,
              vae_factor: int = 8, device: str = "gpu", act_bytes: float = ACT_BYTES_SD3_BLOCK,
              runtime_bytes: float = 0.0) -> dict:
    """Per-rank memory of an SD3-style transformer trained with LoRA adapters under ZeRO-2 or ZeRO-3 (the engine's
    ``model.finetune: lora`` path; ``benchmarks/realscale_cpu.py`` measures it on 2 CPU ranks).

    ``counts`` (elements): ``transformer_base`` (frozen network), ``base_persistent`` (its parameters of at most
    ``persistence`` elements, which ZeRO-3 keeps whole on every rank), ``buffers`` (not partitioned: SD3's
    positional table), ``lora`` ({adapter: elements}; ``policy`` trained, the others snapshots), ``trainable``,
    ``text`` and ``vae`` (frozen, outside DeepSpeed, whole on every rank), ``width``. Returns ``lines`` (bytes),
    ``states_total`` (what the built engine holds before an epoch), ``working_set`` and ``activations`` (added
    during the epoch) and ``total`` (the epoch peak).

    What is counted: the frozen base in the model dtype, partitioned by ZeRO-3 (parameters above the persistence
    threshold) and whole under ZeRO-2; every LoRA adapter whole (its matrices, r x 1536, are below the persistence
    threshold); an fp32 master per snapshot adapter (``engine.snapshots`` keeps one for bf16 weights); the policy's
    fp32 master and AdamW m, v partitioned over the ranks (stage 1+); its gradients in the model dtype plus the fp32
    reduced partition; DeepSpeed's contiguous-gradient reduce bucket of ``reduce_bucket`` elements in the model
    dtype (allocated at ZeRO-3's init, at ZeRO-2's first backward); under ZeRO-3 the gathered parameters of the
    layers in flight (the whole partitioned base while it is below ``max_live_parameters``: DeepSpeed's default
    ``stage3_max_reuse_distance`` keeps them gathered between forward and backward); activations of one
    micro-batch's policy forward without checkpointing (``act_bytes`` per token, hidden unit and block, scaled by
    ``dtype_bytes / 2``); ``runtime_bytes``: the process's resident memory outside tensors (imports done inside the
    run, DeepSpeed and gloo state; about 200 MiB per CPU rank, measured at the tiny size), 0 for device memory.

    ``device``: ``gpu`` counts what the CUDA caching allocator reserves (the whole reduce bucket); ``cpu`` counts
    resident pages, as the CPU measurement sees them: of the reduce bucket only the elements the gradients fill
    (``min(bucket, trainable)``; untouched pages of ``torch.empty`` are not resident), plus, under ZeRO-3, gloo's
    staging copy of one all-gather (gloo gathers into a new flat tensor and copies it out; NCCL gathers in
    place), at most one prefetch bucket (``stage3_prefetch_bucket_size``, the engine sets it to ``reduce_bucket``)."""
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if stage not in (2, 3):
        raise ValueError(f"lora_plan covers ZeRO stages 2 and 3, got {stage}")
    b = dtype_bytes
    lora = counts["lora"]
    t = counts["trainable"]
    base, persistent = counts["transformer_base"], counts.get("base_persistent", 0)
    partitioned = base - persistent
    snapshots = sum(v for k, v in lora.items() if k != "policy")
    lines = {
        "transformer base, frozen (whole; ZeRO-3: partitioned)":
            b * (persistent + partitioned / world if stage == 3 else base),
        "transformer buffers (positional table, whole)": b * counts.get("buffers", 0),
        f"LoRA adapters ({', '.join(lora)}; whole)": b * sum(lora.values()),
        "snapshot fp32 masters": (FP32 * snapshots) if b < FP32 else 0.0,
        "policy fp32 master + AdamW m, v (partitioned)": ((FP32 if b < FP32 else 0) + 2 * FP32) * t / world,
        "policy gradients (model dtype) + fp32 reduced partition": b * t + FP32 * t / world,
        "text encoders + VAE (frozen, whole)": b * (counts.get("text", 0) + counts.get("vae", 0)),
        "process runtime outside tensors (CPU ranks)": runtime_bytes,
    }
    bucket_key = (f"reduce bucket ({reduce_bucket:.0e} elements)" if device == "gpu" else
                  "reduce bucket (the elements gradients fill)")
    lines[bucket_key] = b * (reduce_bucket if device == "gpu" else min(reduce_bucket, t))
    # before the epoch: no gradients yet; the bucket is reserved then only by ZeRO-3 on a GPU (CPU pages unwritten)
    state_keys = [k for k in lines if not k.startswith("policy gradients")
                  and (k != bucket_key or (stage == 3 and device == "gpu"))]
    states = sum(lines[k] for k in state_keys)
    working = b * min(max_live_parameters, partitioned) if stage == 3 else 0.0
    staging = b * min(reduce_bucket, partitioned) if stage == 3 and device == "cpu" else 0.0
    tokens = (resolution // (vae_factor * patch)) ** 2 + text_tokens
    acts = micro_batch * blocks * tokens * counts["width"] * act_bytes * b / 2
    lines["ZeRO-3 gathered parameters (layers in flight)"] = working
    if device == "cpu":
        lines["ZeRO-3 gloo all-gather staging (CPU only)"] = staging
    lines[f"activations (micro-batch {micro_batch}, {tokens} tokens, {blocks} blocks)"] = acts
    total = sum(lines.values())
    return {"lines": lines, "states_total": states, "working_set": working + staging, "activations": acts,
            "total": total,
            "states_keys": state_keys}
