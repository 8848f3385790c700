"""Named adapters on one network: ``policy``, ``old``, ``sampler``, ``fake``, ``ema`` (+ ``pretrained``).

Two modes behind one API (``model.adapters``):

- ``"lora"``: LoRA adapters injected with peft into the single shared network; ``pretrained`` = adapters disabled.
- ``"full"``: full fine-tuning; each name holds a deep copy of the network in an ``nn.ModuleDict`` and
  ``pretrained`` is the original (frozen) network.
- ``"none"`` (a bare model, e.g. during pretraining): one network; ``policy`` and ``pretrained`` both name it.

Switching (``use(name)``) never changes ``requires_grad``: only ``policy`` and ``fake`` are trainable, always.
peft's own ``set_adapter``/``enable_adapters`` toggle ``requires_grad``, so we set the active adapter on each
LoRA layer directly (``_active_adapter`` / ``_disable_adapters``, the attributes peft's forward reads).

Outside any ``use`` block the active LoRA adapter is ``policy``. Gradient checkpointing recomputes the forward during
backward with whatever adapter is active then: a policy backward is therefore right anywhere; run the backward of
another trainable adapter (DIDR's ``fake``) inside ``use("fake")``.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn


#: every adapter a method may attach (the roles are in the module docstring)
ADAPTER_NAMES = ("policy", "old", "sampler", "pretrained", "fake", "ema")
#: adapters that receive gradients (DIDR's fake score is trained next to the generator/policy)
TRAINABLE_NAMES = ("policy", "fake")
#: attention projections of diffusers' joint (SD3/Flux) and plain (UNet) attention blocks
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MODES = ("none", "lora", "full")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft ``LoraConfig``). ``alpha=None`` means ``alpha = rank`` (scale 1)."""

    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    init_lora_weights: bool | str = True  # peft default: A random, B zero -> the adapter starts as the identity

    def peft_config(self):
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be >= 1, got {self.rank}")
        return LoraConfig(r=self.rank, lora_alpha=self.rank if self.alpha is None else self.alpha,
                          lora_dropout=self.dropout, target_modules=list(self.target_modules),
                          init_lora_weights=self.init_lora_weights)


class Adapters(nn.Module):
    """The named weight sets of one network. Build with ``Adapters(net)`` (bare) or
    ``Adapters(net, names=("policy", "old", "sampler"), mode="lora", lora=LoraSettings(rank=8))``.

    In ``lora`` mode ``net`` is modified in place (peft layers injected) and NOT registered here (its owner holds
    it); in ``full`` mode the copies live in ``self.nets`` (registered, so they move/save with the model).
    All non-pretrained adapters start equal to ``policy`` (theta_old == theta_samp == theta at step 0).
    """

    def __init__(self, net: nn.Module, names: Sequence[str] = (), *, mode: str = "none",
                 lora: LoraSettings | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"adapter mode must be one of {MODES}, got {mode!r}")
        names = tuple(dict.fromkeys(n for n in names if n != "pretrained"))
        bad = [n for n in names if n not in ADAPTER_NAMES]
        if bad:
            raise ValueError(f"unknown adapter name(s) {bad}; valid names are {ADAPTER_NAMES}")
        if mode != "none" and "policy" not in names:
            raise ValueError(f"adapter names must include 'policy', got {names}")
        object.__setattr__(self, "_net", net)  # not a submodule: the FlowModel owns and saves it
        self.mode = mode
        self.lora = lora
        self._layers: list[nn.Module] = []
        self._current: str | None = None  # active LoRA adapter, or None when disabled
        if mode == "none":
            self.names = ("pretrained", "policy")
        elif mode == "lora":
            self.names = ("pretrained",) + names
            self._inject_lora(net, names, lora or LoraSettings())
        else:
            self.names = ("pretrained",) + names
            net.requires_grad_(False)
            self.nets = nn.ModuleDict({n: copy.deepcopy(net) for n in names})
            for n, sub in self.nets.items():
                sub.requires_grad_(n in TRAINABLE_NAMES)
        self._params = {n: self._collect_params(n) for n in self.names}
        for n in self.names:
            if n not in ("pretrained", "policy") and mode != "none":
                self.copy_(n, "policy")

    # ----------------------------------------------------------------------------------------------- building
    def _inject_lora(self, net: nn.Module, names: tuple[str, ...], settings: LoraSettings) -> None:
        from peft import inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        cfg = settings.peft_config()
        with warnings.catch_warnings():  # "multiple adapters in the model": intended
            warnings.simplefilter("ignore", UserWarning)
            for n in names:
                try:
                    inject_adapter_in_model(cfg, net, adapter_name=n)
                except ValueError as e:
                    if "not found" not in str(e):
                        raise
                    raise ValueError(f"no module of {type(net).__name__} matches LoRA target_modules "
                                     f"{settings.target_modules}") from None
        self._layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
        if not self._layers:
            raise ValueError(f"no module of {type(net).__name__} matches LoRA target_modules {settings.target_modules}")
        self.peft_config = cfg
        # peft's injection toggles requires_grad per active adapter; set every flag once, explicitly
        net.requires_grad_(False)
        for n in names:
            if n in TRAINABLE_NAMES:
                for p in self._lora_params(n).values():
                    p.requires_grad_(True)
        self._activate("policy")

    def _lora_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{"<module>.lora_A.weight": param, ...}`` for adapter ``name`` (the key layout diffusers exports)."""
        out: dict[str, nn.Parameter] = {}
        for mod_name, mod in self._net.named_modules():
            if mod not in self._layer_set():
                continue
            for attr in mod.adapter_layer_names:
                container = getattr(mod, attr)
                if name not in container:
                    continue
                item = container[name]
                if isinstance(item, nn.Parameter):
                    out[f"{mod_name}.{attr}"] = item
                else:
                    for pn, p in item.named_parameters():
                        out[f"{mod_name}.{attr}.{pn}"] = p
        return out

    def _layer_set(self) -> set:
        if not hasattr(self, "_layer_ids"):
            self._layer_ids = set(self._layers)
        return self._layer_ids

    def _collect_params(self, name: str) -> dict[str, nn.Parameter]:
        if self.mode == "lora":
            return {} if name == "pretrained" else self._lora_params(name)
        if self.mode == "full" and name != "pretrained":
            return dict(self.nets[name].named_parameters())
        return dict(self._net.named_parameters())

    # ---------------------------------------------------------------------------------------------- switching
    def check(self, name: str) -> None:
        """ValueError naming the valid adapters when ``name`` is not one of them."""
        if name not in self.names:
            raise ValueError(f"unknown adapter {name!r}; this model has {self.names} (mode {self.mode!r})")

    def _activate(self, name: str | None) -> None:
        if name == self._current:
            return
        for layer in self._layers:  # what peft's forward reads; set directly so requires_grad is untouched
            if name is None:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = name
        self._current = name

    def module(self, name: str) -> nn.Module:
        """The network that runs adapter ``name`` (in lora mode: the shared network; activate it with ``use``)."""
        self.check(name)
        if self.mode == "full" and name != "pretrained":
            return self.nets[name]
        return self._net

    @contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """Run adapter ``name`` inside the block; yields the network to call. Restores the previous state."""
        net = self.module(name)
        if self.mode != "lora":
            yield net
            return
        prev = self._current
        self._activate(None if name == "pretrained" else name)
        try:
            yield net
        finally:
            self._activate(prev)

    # ------------------------------------------------------------------------------------- parameter algebra
    def params(self, name: str) -> dict[str, nn.Parameter]:
        """Parameters of adapter ``name``; keys are identical across names (aligned), values are the live params."""
        self.check(name)
        return self._params[name]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer owns (``policy`` and ``fake``; the whole network in mode ``none``)."""
        if self.mode == "none":
            return [p for p in self._net.parameters() if p.requires_grad]
        return [p for n in self.names if n in TRAINABLE_NAMES for p in self._params[n].values()]

    def _pair(self, dst: str, src: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.check(dst)
        self.check(src)
        if self.mode == "none":
            raise ValueError("a bare model has a single network; attach adapters (mode 'lora' or 'full') first")
        if dst == "pretrained":
            raise ValueError("the 'pretrained' weights are frozen and cannot be written")
        if src == "pretrained" and self.mode == "lora":
            raise ValueError("'pretrained' has no LoRA weights to copy (it is the network with adapters disabled)")
        d, s = self._params[dst], self._params[src]
        return [d[k] for k in d], [s[k] for k in d]

    @torch.no_grad()
    def copy_(self, dst: str, src: str) -> None:
        """dst <- src (in place, no grad)."""
        d, s = self._pair(dst, src)
        torch._foreach_copy_(d, s)

    @torch.no_grad()
    def ema_(self, dst: str, src: str, decay: float) -> None:
        """dst <- decay * dst + (1 - decay) * src (in place, no grad)."""
        d, s = self._pair(dst, src)
        torch._foreach_mul_(d, float(decay))
        torch._foreach_add_(d, s, alpha=1.0 - float(decay))

    # ------------------------------------------------------------------------------------------------ export
    @torch.no_grad()
    def network_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """A plain state dict (no peft keys) of the network that runs adapter ``name``: in lora mode the adapter is
        merged into the base weights (``W + scale * B @ A``, the network itself is not modified); loadable into a
        fresh, adapter-free copy of the network (e.g. to save a fine-tuned model in its family's own format)."""
        self.check(name)
        if self.mode != "lora":
            return {k: v.detach() for k, v in self.module(name).state_dict().items()}
        out = {k.replace(".base_layer.", "."): v.detach() for k, v in self._net.state_dict().items()
               if "lora_" not in k}
        if name == "pretrained":
            return out
        for mod_name, layer in self._net.named_modules():
            if layer in self._layer_set() and name in layer.lora_A:
                key = f"{mod_name}.weight"
                out[key] = out[key] + layer.get_delta_weight(name).to(out[key].dtype)
        return out

    def export_lora(self, save_dir: str | os.PathLike, name: str = "policy", *, prefix: str = "transformer",
                    weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
        """Write adapter ``name`` as a diffusers LoRA file (``<prefix>.<module>.lora_A.weight`` keys, safetensors,
        with the peft config as ``lora_adapter_metadata``) that ``pipe.load_lora_weights(save_dir)`` loads.
        Returns the file path."""
        from safetensors.torch import save_file

        if self.mode != "lora":
            raise ValueError(f"export_lora needs mode 'lora', this model's adapters are in mode {self.mode!r}")
        if name == "pretrained":
            raise ValueError("'pretrained' has no LoRA weights to export")
        self.check(name)
        tensors = {f"{prefix}.{k}": p.detach().contiguous().cpu() for k, p in self._params[name].items()}
        meta_cfg = {}
        for k, v in self.peft_config.to_dict().items():
            meta_cfg[f"{prefix}.{k}"] = sorted(v) if isinstance(v, set) else v
        os.makedirs(save_dir, exist_ok=True)
        path = Path(save_dir) / weight_name
        save_file(tensors, str(path), metadata={"format": "pt",
                                           "lora_adapter_metadata": json.dumps(meta_cfg, indent=2, sort_keys=True)})
        return path
