"""The testbed model (spec/testbed.md): a tiny pixel-space text-to-image flow model.

- Network: diffusers ``SD3Transformer2DModel`` (MMDiT) from a small config on 3-channel pixels. It takes
  ``timestep = 1000 * sigma`` and predicts ``eps - x0`` natively, i.e. exactly our flow convention (tested against
  diffusers' ``FlowMatchEulerDiscreteScheduler``).
- Text: a word-level tokenizer built locally from the world's vocabulary (``PreTrainedTokenizerFast`` over a
  ``tokenizers`` WordLevel model) and a tiny ``CLIPTextModel``: last hidden state = ``embeds``, pooled output =
  ``pooled``.
- Identity autoencoder: ``x = 2 * img - 1``, ``decode(x) = clamp((x + 1) / 2, 0, 1)``.

Checkpoint directory (diffusers style): ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``testbed.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from models.attention import set_attention_backend
from models.base import Cond, FlowModel, PromptCache, as_sigma_batch
from models.lora import Adapters
from models.samplers import flow_match_sigmas

FAMILY = "testbed"
FORMAT_VERSION = 1
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3; EOS != 2 so CLIP pools at the first EOS (not the legacy argmax)


@dataclass
class TestbedConfig:
    """Sizes of the testbed model. Defaults: 32x32 RGB, patch 2, 4 MMDiT layers of 4 heads x 32, text width 128."""

    __test__ = False  # not a pytest test class

    sample_size: int = 32
    channels: int = 3
    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    qk_norm: str | None = "rms_norm"
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_length: int = 16
    shift: float = 1.0
    train_text_encoder: bool = False
    attention: str = "auto"  # models.attention backend: flash-attn on CUDA bf16/fp16 when installed, else SDPA

    def __post_init__(self) -> None:
        if self.sample_size % self.patch_size:
            raise ValueError(f"TestbedConfig.sample_size ({self.sample_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        if self.text_width % self.text_heads:
            raise ValueError(f"TestbedConfig.text_width ({self.text_width}) must be divisible by "
                             f"text_heads ({self.text_heads})")
        if self.max_length < 3:
            raise ValueError(f"TestbedConfig.max_length must be >= 3 (bos, a word, eos), got {self.max_length}")

    @classmethod
    def from_dict(cls, d: dict) -> "TestbedConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TestbedConfig key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def build_tokenizer(vocab: Sequence[str], max_length: int = 16):
    """A word-level ``PreTrainedTokenizerFast`` over ``vocab`` (lower-cased words; punctuation split off).

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the words in order. Every encoding is
    ``<bos> words <eos> <pad>...`` padded/truncated to ``max_length``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w.lower() for w in vocab if w.lower() not in SPECIAL_TOKENS]
    words = list(dict.fromkeys(words))
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"vocabulary entries must be single non-empty words, got {bad[:5]}")
    table = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    table.update({w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                       special_tokens=[(BOS, table[BOS]), (EOS, table[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, model_max_length=max_length, padding_side="right")


def _build_transformer(cfg: TestbedConfig):
    from diffusers import SD3Transformer2DModel

    inner = cfg.num_attention_heads * cfg.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.channels,
        out_channels=cfg.channels, num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.text_width,
        caption_projection_dim=inner, pooled_projection_dim=cfg.text_width,
        pos_embed_max_size=cfg.sample_size // cfg.patch_size, qk_norm=cfg.qk_norm)


def _build_text_encoder(cfg: TestbedConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_intermediate,
        projection_dim=cfg.text_width, num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3))


class TestbedModel(FlowModel):
    """Tiny pixel-space MMDiT text-to-image flow model behind the ``FlowModel`` protocol.

    Build with ``TestbedModel.from_config(TestbedConfig(), vocab)`` or load with ``TestbedModel.from_pretrained(dir)``.
    """

    __test__ = False

    adapted_attr = "transformer"

    def __init__(self, transformer, text_encoder, tokenizer, config: TestbedConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.resolution_factor = config.patch_size
        self.prompt_cache = PromptCache()
        self._null: Cond | None = None
        self.adapters = Adapters(self.transformer)
        set_attention_backend(self.transformer, config.attention)
        self.set_text_encoder_trainable(config.train_text_encoder)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model_cfg, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> "TestbedModel":
        """A run's testbed model: random-init from ``model_cfg.size`` (TestbedConfig overrides) with the world's
        vocabulary when ``random_init``, else the pretrained directory ``model_cfg.path``."""
        from engine.errors import ConfigError
        if model_cfg.random_init:
            from engine.testbed.world import vocabulary_words
            return cls.from_config(TestbedConfig.from_dict(dict(model_cfg.size)), vocabulary_words(), seed=seed)
        if not os.path.isdir(model_cfg.path):
            raise ConfigError(f"config key 'model.path': model directory {model_cfg.path!r} does not exist "
                              "(train the testbed base model first, or set model.random_init=true)")
        return cls.from_pretrained(model_cfg.path, dtype=dtype)

    @classmethod
    def from_config(cls, config: TestbedConfig | None = None, vocab: Sequence[str] = (), *, seed: int = 0
                    ) -> "TestbedModel":
        """A randomly initialised model (deterministic from ``seed``) whose tokenizer knows the words of ``vocab``."""
        config = config or TestbedConfig()
        if not len(vocab):
            raise ValueError("TestbedModel.from_config needs a non-empty vocabulary (list of words)")
        tokenizer = build_tokenizer(vocab, config.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = _build_transformer(config)
            text_encoder = _build_text_encoder(config, len(tokenizer))
        return cls(transformer, text_encoder, tokenizer, config)

    def save_pretrained(self, save_dir: str | os.PathLike, *, adapter: str = "pretrained") -> None:
        """Write ``transformer/``, ``text_encoder/``, ``tokenizer/`` and ``testbed.json``: a plain testbed model whose
        transformer is the network of ``adapter`` ("pretrained" by default; "policy" saves the fine-tuned model with
        its LoRA merged). To ship only the LoRA, use ``adapters.export_lora``."""
        from diffusers import SD3Transformer2DModel

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        transformer = self.adapters.module(adapter)
        if self.adapters.mode == "lora":  # peft layers are injected in place: save plain (merged) weights
            state = self.adapters.network_state_dict(adapter)
            dtype = next(iter(state.values())).dtype
            transformer = SD3Transformer2DModel.from_config(transformer.config)
            if dtype != torch.float32:
                transformer = transformer.to(dtype)
            transformer.load_state_dict(state, strict=True)
        transformer.save_pretrained(save_dir / "transformer", safe_serialization=True)
        self.text_encoder.save_pretrained(save_dir / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(save_dir / "tokenizer")
        meta = {"family": FAMILY, "format_version": FORMAT_VERSION, "config": asdict(self.config)}
        (save_dir / "testbed.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "TestbedModel":
        """Load a directory written by ``save_pretrained``; clear errors for a missing or wrong-family directory."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"testbed model directory {str(path)!r} does not exist")
        meta_file = path / "testbed.json"
        if not meta_file.is_file():
            hint = ""
            if (path / "model_index.json").is_file():
                cls_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "?")
                hint = f" (it is a diffusers {cls_name} directory: load it with that family's adapter)"
            raise ValueError(f"{str(path)!r} is not a testbed checkpoint: testbed.json is missing{hint}")
        meta = json.loads(meta_file.read_text())
        if meta.get("family") != FAMILY:
            raise ValueError(f"{str(meta_file)!r} has family {meta.get('family')!r}, expected {FAMILY!r}")
        for sub in ("transformer", "text_encoder", "tokenizer"):
            if not (path / sub).is_dir():
                raise ValueError(f"testbed checkpoint {str(path)!r} lacks its {sub}/ subfolder")
        config = TestbedConfig.from_dict(meta.get("config", {}))
        transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
        model = cls(transformer, text_encoder, tokenizer, config)
        return model.to(device).eval()

    # ------------------------------------------------------------------------------------------ text side
    def set_text_encoder_trainable(self, trainable: bool) -> None:
        """Pretraining trains the text encoder (then embeddings are never cached); RL keeps it frozen (cached)."""
        self.config.train_text_encoder = bool(trainable)
        self.text_encoder.requires_grad_(bool(trainable))
        self._clear_text_caches()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, max_length] on the text encoder's device."""
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_length, return_tensors="pt")
        return out["input_ids"].to(self.text_encoder.device)

    def _encode_texts(self, prompts: Sequence[str]) -> Cond:
        out = self.text_encoder(input_ids=self.tokenize(prompts))
        return Cond(embeds=out.last_hidden_state, pooled=out.pooler_output)

    def encode(self, prompts: Sequence[str], ids: Sequence[object] | None = None) -> Cond:
        """Text condition for ``prompts``. With a frozen text encoder, embeddings are cached per prompt id
        (``ids``, e.g. dataset indices) or, when ``ids`` is None, per prompt text."""
        if isinstance(prompts, str):
            raise ValueError("encode expects a list of prompts, got a single string")
        if self.config.train_text_encoder:
            return self._encode_texts(prompts)
        if ids is None:
            keys = list(prompts)
        else:  # prompt ids (ints or a LongTensor: one host read here, at encode time, not in a micro-step)
            keys = [("id", int(i)) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        with torch.no_grad():
            return self.prompt_cache.lookup(keys, list(prompts), self._encode_texts)

    def null_cond(self, n: int) -> Cond:
        """The encoding of the empty prompt, ``n`` rows (stride-0 views of one cached row: no copy, no transfer)."""
        if self.config.train_text_encoder:
            one = self._encode_texts([""])
        else:
            if self._null is None:
                self._null = self.encode([""])
            one = self._null
        return one._map(lambda t: t.expand(n, *t.shape[1:]))

    def _apply(self, fn, *args, **kwargs):
        self._clear_text_caches()  # .to()/.half() etc.: cached embeddings would be on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._clear_text_caches()  # new text-encoder weights invalidate cached embeddings
        return super().load_state_dict(*args, **kwargs)

    def _clear_text_caches(self) -> None:
        self.prompt_cache.clear()
        self._null = None

    # ------------------------------------------------------------------------------------------ image side
    def check_resolution(self, height: int, width: int) -> None:
        p, top = self.config.patch_size, self.config.sample_size
        if height % p or width % p:
            raise ValueError(f"resolution {height}x{width} is not divisible by the testbed patch size {p}")
        if height > top or width > top:
            raise ValueError(f"resolution {height}x{width} exceeds the testbed maximum {top}x{top}")

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        self.check_resolution(height, width)
        return (self.config.channels, height, width)

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents in [-1, 1] (identity autoencoder)."""
        return 2 * images - 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """diffusers FlowMatchEulerDiscreteScheduler's table with this model's shift (1 first, 0 last)."""
        return flow_match_sigmas(num_steps, self.config.shift, device=self.transformer.device)

    # ------------------------------------------------------------------------------------------ the network
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond, *, adapter: str = "policy"
                 ) -> torch.Tensor:
        """``v ~ eps - x0`` at ``sigma`` (the SD3 transformer's native output at ``timestep = 1000 * sigma``).
        Returns the network's dtype."""
        if x.ndim != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"x must be [B, {self.config.channels}, H, W], got {tuple(x.shape)}")
        self.check_resolution(x.shape[2], x.shape[3])
        b = x.shape[0]
        if len(cond) != b:
            raise ValueError(f"cond has {len(cond)} rows for a batch of {b} latents")
        sig = as_sigma_batch(sigma, b, x)
        dtype = self.transformer.dtype
        with self.adapters.use(adapter) as net:
            return net(hidden_states=x.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                       pooled_projections=cond.pooled.to(dtype), timestep=sig * 1000, return_dict=False)[0]
