"""Model adapters behind one protocol (``models.base.FlowModel``); see ../shared/spec/architecture.md.

Core: ``base`` (protocol, ``Cond``, ``PromptCache``), ``lora`` (named adapters), ``samplers`` (schedules, ODE,
FDFO pairs, one-step), ``attention`` (flash-attn / SDPA), ``testbed`` (the tiny pixel-space model).
Heavy libraries (diffusers, transformers, peft) are imported inside the functions that need them.

Model families: :data:`FAMILIES` maps ``model.family`` to a :class:`~models.base.FlowModel` subclass; the engine
builds a run's model with ``FAMILIES.get(name).load(model_cfg, dtype=..., seed=...)``. A new family is one file
(a FlowModel subclass: ``from_pretrained`` or its own ``load``) and one line here - or no line at all: a recipe may
name it as ``model.family: mypkg.models:MyFlow``.
"""
from engine.registry import Registry
from models.base import Cond, FlowModel, PromptCache, as_sigma_batch
from models.lora import ADAPTER_NAMES, TRAINABLE_NAMES, Adapters, LoraSettings
from models.samplers import (PairRollout, Trajectory, flow_match_sigmas, linear_sigmas, one_step, sample_fdfo_pairs,
                             sample_ode)

#: model family name -> FlowModel subclass ("module:Class", imported when first used)
FAMILIES = Registry("model family", {
    "testbed": "models.testbed:TestbedModel",   # the tiny pixel-space MMDiT of the CPU testbed
    "sd3": "models.sd3:SD3Model",               # SD3 / SD3.5 (diffusers directory)
    "flux": "models.flux:FluxModel",            # FLUX.1 dev / schnell
    "onestep": "models.onestep:UNetOneStep",    # SD/SDXL-Turbo-style one-step UNet generators
    "gmm": "models.gmm:GMMFlow",                # the known-answer world: Gaussian mixtures, closed-form optimum
})

__all__ = ["FAMILIES", "ADAPTER_NAMES", "TRAINABLE_NAMES", "Adapters", "Cond", "FlowModel", "LoraSettings",
           "PairRollout", "PromptCache", "Trajectory", "as_sigma_batch", "flow_match_sigmas", "linear_sigmas",
           "one_step", "sample_fdfo_pairs", "sample_ode"]
