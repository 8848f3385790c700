"""Method registry and the interface every training method implements.

A method is a class registered under a name with :func:`register`; ``engine/train.py --method NAME`` picks it::

    @register("crd")
    class CRD(Method):
        Config = CRDConfig                  # dataclass of its options = YAML section ``crd:`` / overrides ``crd.x=1``
        adapters = ("policy", "old", "sampler")   # named weights the model needs (``pretrained`` is implicit)

        def schedules(self) -> dict[str, Schedule]      # EMA snapshots and their schedules (may be empty)
        def rollout(self, ctx, batch) -> Rollout         # sample this rank's part of the epoch
        def advantages(self, ctx, rollout, scores) -> Any  # rewards -> what update needs (None if no rewards)
        def update(self, ctx, rollout, adv) -> list[dict]   # this epoch's optimizer steps; metrics per step
        def snapshot_update(self, ctx) -> dict              # after the steps (default: EMA per schedules)
        def eval_sample(self, ctx, noise, cond, adapter) -> x0  # held-out samples (default: the rollout ODE)

The loop (``engine/loop.py``) calls, per epoch: ``rollout -> decode -> reward -> advantages -> update ->
snapshot_update -> log/eval/checkpoint``. What varies between methods stays inside them:

- CRD / NFT (``crd.py``, ``nft.py``): ODE rollouts with a snapshot, ``x0`` only; grouped advantages; K timesteps per
  sample with stored noise; snapshot velocities once per epoch; fused loss kernels.
- FDFO: ``rollout`` runs the churned pair sampler and keeps states/velocities in ``Rollout.extras``; ``advantages``
  returns the finite-difference pairs; ``exact_groups = False`` (no group centering); no schedules.
- DIDR: ``needs_rewards = False`` (the loop skips decode/score/advantages and passes ``None``); ``rollout`` returns
  only prompts, conditions and latent noise (``x0=None``); ``update`` runs generator/TA steps with the
  differentiable reward ``ctx.rewards.score_differentiable``.

``ctx`` (:class:`engine.context.Context`) gives: ``cfg``, ``model`` (the FlowModel proxy whose ``velocity`` routes
through the DeepSpeed engine; ``model.flow`` the FlowModel itself), ``stepper`` (:mod:`engine.stepper`:
``backward(loss, last=...)`` and ``metrics()``; the only way a method trains the engine's parameters), ``dist``
(rank, gathers of detached per-sample scalars), ``layout`` (:class:`~engine.batch.BatchLayout`: which global samples
this rank holds, micro-batches, accumulation), ``prompts``, ``rewards``, ``snapshots``, ``sigmas()``,
``global_step``, ``epoch``. ``Rollout`` and the deterministic per-sample draws (``sample_noise``,
``sample_subsets``, keyed by global sample index so any world size draws the same numbers) are in
:mod:`engine.rollout`; ``engine.methods.common`` has the bad-reward policy, the grouped advantages, stored training
timesteps, once-per-epoch snapshot velocities and the CRD/NFT micro-step skeleton ``forward_process_update``.

Metrics: ``update`` returns one dict per optimizer step, reduced once per step (``engine.runlog.StepStats``);
nothing inside a micro-step may read a value to the host.
"""
from __future__ import annotations

from typing import Any

from engine.errors import ConfigError
from engine.registry import Registry, is_import_path

#: method name -> Method subclass; built-ins are "module:Class" paths imported when first used, so listing the
#: names imports no torch code. ``method: mypkg.methods:MyMethod`` names a user's own Method subclass.
METHODS = Registry("method", {"crd": "engine.methods.crd:CRD", "nft": "engine.methods.nft:NFT",
                              "fdfo": "engine.methods.fdfo:FDFOMethod", "didr": "engine.methods.didr:DIDRMethod",
                              "grpo": "engine.methods.grpo:GRPOMethod"})


def register(name: str):
    """Class decorator adding a :class:`Method` subclass to :data:`METHODS` under ``name`` (its YAML section)."""
    def deco(cls):
        cls.name = name
        METHODS.register(name, cls)
        return cls
    return deco


def get_method(name: str) -> type["Method"]:
    """The Method subclass registered as ``name`` or at the ``"module:Class"`` path ``name`` (ConfigError if none)."""
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r} is {cls!r}, not a subclass of engine.methods.Method")
    return cls


def section_name(name: str) -> str:
    """The YAML section holding a method's options: its registered name; for a ``"module:Class"`` plug-in, the
    class's own ``name`` when it sets one, else the path itself."""
    if is_import_path(name):
        return get_method(name).name or name
    return name


def method_configs(chosen: str | None = None) -> dict[str, type]:
    """``{section: options dataclass}`` of every registered method, plus the ``chosen`` plug-in path if one."""
    configs = {name: get_method(name).Config for name in METHODS.names()}
    if chosen is not None and is_import_path(chosen):
        configs[section_name(chosen)] = get_method(chosen).Config
    return configs


class Method:
    """Base class of a training method; see the module docstring for the contract."""

    name: str = ""
    Config: type = object
    #: adapters the model must carry besides ``pretrained`` (LoRA adapters or full copies)
    adapters: tuple[str, ...] = ("policy",)
    #: False for methods without scored rollouts (DIDR): the loop skips decode/reward/advantages
    needs_rewards: bool = True
    #: True when the loss centers within prompt groups, so the batch layout must keep groups whole
    exact_groups: bool = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.opt = cfg.algo

    def schedules(self) -> dict:
        return {}

    def rollout(self, ctx, batch) -> Any:
        raise NotImplementedError

    def advantages(self, ctx, rollout, scores) -> Any:
        return None

    def update(self, ctx, rollout, adv) -> list[dict]:
        raise NotImplementedError

    def eval_sample(self, ctx, noise, cond, adapter: str = "policy"):
        """Held-out samples x0 from ``noise`` (evaluation): the rollout ODE (``rollout.num_steps``, no CFG).
        Methods that sample differently (one-step generators, FDFO's own step count / CFG) override it."""
        from models.samplers import sample_ode
        return sample_ode(ctx.model, noise, cond, ctx.sigmas(), adapter=adapter)

    def snapshot_update(self, ctx) -> dict:
        """EMA of every snapshot toward the policy with its schedule at the current optimizer step."""
        if ctx.snapshots is None:
            return {}
        return ctx.snapshots.update(ctx.global_step)

    def state_dict(self) -> dict:
        """Method-specific counters to checkpoint (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict:
        """This rank's method tensors to checkpoint beside the engine's (e.g. optimizers the method owns itself,
        outside DeepSpeed); written as ``method_rank{r}.safetensors`` (``engine.checkpoint.write_tree``: tensors,
        numbers, strings, lists, tuples, dicts; no other objects: nothing is unpickled on load). Default: nothing."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        """Restore :meth:`rank_state` (called on resume, before the first epoch)."""
