"""Analytic FLOPs of one transformer forward pass, from the model config (what MFU is computed from).

Counted: every matmul of the network (projections, MLPs, embedders, modulation linears, output projection) and the
two attention matmuls (``Q K^T`` and ``A V``), as ``2 * multiply-adds``. Not counted: norms, activations, softmax,
RoPE, LoRA adapters (rank r adds ``2 r (d_in + d_out)`` per token per adapted linear: under 3% at r32 for SD3.5-M,
stated separately by :func:`lora_forward_flops`). Training = 3 x forward (forward + backward, the usual convention;
with a frozen base and LoRA the weight-gradient half of the backward is mostly skipped, so this overstates the
work a LoRA step needs and MFU is then an upper-bound style figure: say which one is reported).

``test_flops.py`` checks :func:`sd3_forward_flops` against ``torch.utils.flop_counter.FlopCounterMode`` on real
diffusers modules.
"""
from __future__ import annotations


def _mm(tokens: float, d_in: float, d_out: float) -> float:
    return 2.0 * tokens * d_in * d_out


def sd3_forward_flops(config: dict, batch: int, height: int, width: int, text_tokens: int) -> float:
    """FLOPs of one ``SD3Transformer2DModel`` forward on ``batch`` latents of ``height x width`` (latent pixels),
    with ``text_tokens`` text tokens. ``config`` holds the diffusers config keys (``sample_size`` etc.)."""
    p = config["patch_size"]
    heads, hd = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * hd
    c_in, c_out = config["in_channels"], config.get("out_channels") or config["in_channels"]
    layers = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    ni = (height // p) * (width // p)
    nt = text_tokens
    n = ni + nt
    joint_dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]
    caption_dim = config.get("caption_projection_dim") or d

    f = 0.0
    f += _mm(ni, c_in * p * p, d)                               # patch embedding (conv as a matmul)
    f += _mm(1, 256, d) + _mm(1, d, d)                          # timestep embedding MLP
    f += _mm(1, pooled_dim, d) + _mm(1, d, d)                   # pooled text embedding MLP
    f += _mm(nt, joint_dim, caption_dim)                        # context embedder
    for i in range(layers):
        last = i == layers - 1                                  # context_pre_only block
        f += _mm(1, d, (9 if i in dual else 6) * d)             # image adaLN modulation
        f += _mm(1, d, (2 if last else 6) * d)                  # text adaLN modulation
        f += _mm(ni, d, 3 * d) + _mm(nt, d, 3 * d)              # q, k, v of both streams
        f += 2 * 2.0 * n * n * d                                # joint attention: Q K^T and A V
        f += _mm(ni, d, d)                                      # image output projection
        f += _mm(ni, d, 4 * d) + _mm(ni, 4 * d, d)              # image MLP
        if not last:
            f += _mm(nt, d, d) + _mm(nt, d, 4 * d) + _mm(nt, 4 * d, d)  # text output projection + MLP
        if i in dual:                                           # SD3.5 second (image-only) attention
            f += _mm(ni, d, 3 * d) + 2 * 2.0 * ni * ni * d + _mm(ni, d, d)
    f += _mm(1, d, 2 * d)                                       # output adaLN
    f += _mm(ni, d, p * p * c_out)                              # output projection
    return batch * f


def flux_forward_flops(config: dict, batch: int, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one ``FluxTransformer2DModel`` forward: ``image_tokens`` packed latent tokens (512 px: 1024)."""
    heads, hd = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * hd
    c = config["in_channels"]
    ni, nt = image_tokens, text_tokens
    n = ni + nt
    f = 0.0
    f += _mm(ni, c, d) + _mm(nt, config["joint_attention_dim"], d)   # x and context embedders
    emb_mlps = 3 if config.get("guidance_embeds") else 2               # timestep (+ guidance) + pooled text
    f += (emb_mlps - 1) * (_mm(1, 256, d) + _mm(1, d, d)) + _mm(1, config["pooled_projection_dim"], d) + _mm(1, d, d)
    for _ in range(config["num_layers"]):                             # double-stream blocks
        f += 2 * _mm(1, d, 6 * d)                                     # adaLN of both streams
        f += _mm(n, d, 3 * d) + 2 * 2.0 * n * n * d + _mm(n, d, d)    # qkv, attention, output of both streams
        f += _mm(n, d, 4 * d) + _mm(n, 4 * d, d)                      # MLPs of both streams
    for _ in range(config["num_single_layers"]):                      # single-stream blocks
        f += _mm(1, d, 3 * d)                                         # adaLN
        f += _mm(n, d, 3 * d) + 2 * 2.0 * n * n * d                   # qkv + attention
        f += _mm(n, d, 4 * d) + _mm(n, 5 * d, d)                      # MLP in, fused (attn + MLP) output
    f += _mm(1, d, 2 * d) + _mm(ni, d, c)                             # output adaLN + projection
    return batch * f


def lora_forward_flops(num_adapted_linears_per_token: float, rank: int, d_in: int, d_out: int, tokens: float
                       ) -> float:
    """Extra FLOPs of LoRA adapters: ``2 r (d_in + d_out)`` per token per adapted linear."""
    return 2.0 * rank * (d_in + d_out) * tokens * num_adapted_linears_per_token


def config_of_testbed(size: dict | None = None) -> dict:
    """The diffusers config of the testbed MMDiT (``models.testbed._build_transformer``) for a ``TestbedConfig``."""
    from models.testbed import TestbedConfig
    c = TestbedConfig(**(size or {}))
    inner = c.num_attention_heads * c.attention_head_dim
    return dict(sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.channels, out_channels=c.channels,
                num_layers=c.num_layers, attention_head_dim=c.attention_head_dim,
                num_attention_heads=c.num_attention_heads, joint_attention_dim=c.text_width,
                caption_projection_dim=inner, pooled_projection_dim=c.text_width,
                dual_attention_layers=(), max_length=c.max_length)


def forward_flops_of_testbed(batch: int, size: dict | None = None, resolution: int | None = None) -> float:
    cfg = config_of_testbed(size)
    res = resolution or cfg["sample_size"]
    return sd3_forward_flops(cfg, batch, res, res, cfg["max_length"])


def training_flops(forward_flops: float) -> float:
    """Forward + backward = 3 forward passes (convention for MFU)."""
    return 3.0 * forward_flops


#: dense bf16 peak (no sparsity) of GPUs MFU is reported against, FLOP/s
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def device_kind(device_name: str) -> str | None:
    """The key of a CUDA device in the vendor-figure tables (``PEAK_BF16``, gpu_check's HBM table) by its name."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device by name (None when unknown: then report FLOP/s, not MFU)."""
    return PEAK_BF16.get(device_kind(device_name))
