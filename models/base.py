"""The model adapter protocol: what methods may touch (see ../shared/spec/architecture.md).

Every model family converts its native parametrisation to the flow convention of spec/methods.md at this boundary:
``x_sigma = (1 - sigma) * x0 + sigma * eps``, the network predicts ``v ~ eps - x0``, sigma = 1 is pure noise.
Methods never reach into transformer internals, never call diffusers pipelines, never convert parametrisations.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
from torch import nn

from models.lora import Adapters


@dataclass
class Cond:
    """Text conditioning for a batch: everything ``velocity`` needs besides ``x`` and ``sigma``.

    ``embeds`` [B, L, D] token embeddings; ``pooled`` [B, P] pooled embedding (SD3/Flux) or None;
    ``mask`` [B, L] attention mask or None; ``extra`` holds family-specific tensors with batch dim first
    (e.g. Flux ``txt_ids`` are not batched and are rebuilt by the adapter, not stored here).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> "Cond":
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if f.name == "extra":
                out["extra"] = {k: fn(v) for k, v in val.items()}
            else:
                out[f.name] = None if val is None else fn(val)
        return Cond(**out)

    def index(self, idx: torch.Tensor | slice) -> "Cond":
        """Rows ``idx`` of every tensor (a LongTensor or a slice)."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, g: int) -> "Cond":
        """Each row repeated ``g`` times in place (prompt p -> rows p*g .. p*g+g-1): one group per prompt."""
        return self._map(lambda t: t.repeat_interleave(g, dim=0))

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else t.to(
            *[a for a in args if not isinstance(a, torch.dtype)],
            **{k: v for k, v in kwargs.items() if k != "dtype"}))

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Concatenate along the batch dimension (all conds must carry the same optional fields)."""
        first = conds[0]
        out = {}
        for f in fields(first):
            vals = [getattr(c, f.name) for c in conds]
            if f.name == "extra":
                out["extra"] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
            elif vals[0] is None:
                out[f.name] = None
            else:
                out[f.name] = torch.cat(vals)
        return Cond(**out)


def as_sigma_batch(sigma: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """sigma as a float32 vector of length ``batch`` on ``like``'s device (accepts a float, a 0-d or a [B] tensor)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(s.shape)}")
    return s


class FlowModel(nn.Module):
    """One model family behind one protocol. Subclasses implement the abstract methods below.

    ``adapter`` names which weights run: ``policy`` (trained), ``old`` (moving reference), ``sampler`` (rollout
    snapshot), ``pretrained`` (LoRA off / frozen copy), ``fake`` (DIDR fake score), ``ema`` (eval EMA).
    The same ``velocity`` serves rollout and training, so identical inputs give bit-identical outputs.
    """

    #: patch/VAE factor the pixel resolution must be divisible by
    resolution_factor: int = 1
    #: attribute holding the network that adapters wrap ("transformer", "unet")
    adapted_attr: str = "transformer"

    @classmethod
    def load(cls, model_cfg, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> "FlowModel":
        """The model a run's ``model:`` section names (the model-family contract, ``models.FAMILIES``): by default
        ``from_pretrained(model_cfg.path, dtype=..., resolution=model_cfg.resolution)`` from a local directory (the
        resolution sets Flux-dev's schedule shift and SDXL's micro-conditioning). Families that build otherwise
        (the testbed's ``random_init``) override it."""
        import os

        from engine.errors import ConfigError
        if not os.path.isdir(model_cfg.path):
            raise ConfigError(f"config key 'model.path': model directory {model_cfg.path!r} does not exist")
        return cls.from_pretrained(model_cfg.path, dtype=dtype, resolution=model_cfg.resolution)

    def attach_adapters(self, names: Sequence[str] = ("policy", "old", "sampler"), *, mode: str = "lora",
                        lora=None):
        """Give this model named adapters (``models.lora.Adapters``) on its network; returns ``self.adapters``.

        ``mode`` "lora" (peft LoRA on the shared network, ``lora`` a ``LoraSettings``) or "full" (deep copies).
        """
        if getattr(self, "adapters", None) is not None and self.adapters.mode != "none":
            raise ValueError(f"adapters are already attached (mode {self.adapters.mode!r}, "
                             f"names {self.adapters.names})")
        self.adapters = Adapters(getattr(self, self.adapted_attr), names, mode=mode, lora=lora)
        return self.adapters

    def encode(self, prompts: Sequence[str]) -> Cond:
        raise NotImplementedError

    def null_cond(self, n: int) -> Cond:
        """The empty-prompt condition repeated ``n`` times (for CFG)."""
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond, *, adapter: str = "policy"
                 ) -> torch.Tensor:
        """Flow velocity ``v ~ eps - x0`` at noise level ``sigma`` (scalar or [B]) in the spec's convention."""
        raise NotImplementedError

    def velocity_cfg_pair(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond, *,
                          adapter: str = "pretrained") -> tuple[torch.Tensor, torch.Tensor]:
        """(v_cond, v_uncond) from ONE batched forward (cond and null rows stacked).

        Families with distilled guidance (FLUX.1-dev) override this to return (v_guided, v_guided), so any CFG
        combine ``v_u + w (v_c - v_u)`` yields the guided velocity.
        """
        b = x.shape[0]
        sig = as_sigma_batch(sigma, b, x)
        both = self.velocity(torch.cat([x, x]), torch.cat([sig, sig]), Cond.cat([cond, self.null_cond(b)]),
                             adapter=adapter)
        return both[:b], both[b:]

    def guided_velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond, scale: float, *,
                        adapter: str = "pretrained") -> torch.Tensor:
        """CFG velocity ``v_u + scale (v_c - v_u)``; scale == 1 is a single unguided pass."""
        if scale == 1.0:
            return self.velocity(x, sigma, cond, adapter=adapter)
        v_c, v_u = self.velocity_cfg_pair(x, sigma, cond, adapter=adapter)
        return v_u + scale * (v_c - v_u)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The model's own sampling schedule (with its shift): ``num_steps + 1`` values, 1 first, 0 last."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], NCHW float."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent (no batch dim) for an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError


class PromptCache:
    """Prompt-embedding cache for frozen text encoders: prompt key (id or text) -> one row of a ``Cond`` bank.

    ``lookup(keys, encode_fn)`` encodes only the missing keys (one batched ``encode_fn`` call with their texts),
    then gathers every requested row with ONE index op per tensor. Keys are prompt ids (ints) or prompt texts.
    Call ``clear()`` whenever the text encoder's weights change (load, pretraining step).
    """

    def __init__(self) -> None:
        self._rows: dict[object, int] = {}
        self._bank: Cond | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self._bank = None

    def lookup(self, keys: Sequence[object], texts: Sequence[str], encode_fn) -> Cond:
        """Rows for ``keys`` (``texts[i]`` is the prompt of ``keys[i]``); misses are encoded with ``encode_fn``."""
        if len(keys) != len(texts):
            raise ValueError(f"PromptCache.lookup: got {len(keys)} keys for {len(texts)} prompts")
        missing: dict[object, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._rows and k not in missing:
                missing[k] = t
        if missing:
            new = encode_fn(list(missing.values()))
            start = 0 if self._bank is None else len(self._bank)
            for i, k in enumerate(missing):
                self._rows[k] = start + i
            self._bank = new if self._bank is None else Cond.cat([self._bank, new])
        idx = torch.tensor([self._rows[k] for k in keys], dtype=torch.long, device=self._bank.embeds.device)
        return self._bank.index(idx)
