"""Reward registry (:data:`REWARDS`), the one :class:`RewardSpec`, and ``build_rewards(specs) -> RewardSet``.

Rewards are registered by import path and imported only when built, so heavy or optional dependencies (transformers
models, pytesseract, the testbed world) load only for the rewards a run uses. A spec's ``name`` is a registered name
or a ``"module:callable"`` path to a user's own reward (``rewards: [{name: mypkg.rewards:score}]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from engine.errors import ConfigError
from engine.options import opt
from engine.registry import Registry

from .base import Reward
from .combine import RewardSet, WeightedReward

#: reward name -> "module:callable" building the reward from the spec's kwargs
REWARDS = Registry("reward", {
    "ocr": "engine.rewards.ocr:OcrReward",
    "geneval": "engine.rewards.geneval:build_geneval_reward",
    "testbed_geneval": "engine.testbed.detector:build_testbed_geneval_reward",
    "testbed_classifier": "engine.testbed.classifier:ClassifierReward",
    "clip_score": "engine.rewards.preference:ClipScoreReward",
    "pickscore": "engine.rewards.preference:PickScoreReward",
    "hps": "engine.rewards.preference:HPSReward",
    "aesthetic": "engine.rewards.preference:AestheticReward",
    "imagereward": "engine.rewards.preference:ImageRewardReward",
    "gmm": "engine.known_answer.rewards:WorldReward",   # the known-answer world's closed-form rewards ([N, d] points)
    "vlm_yesno": "engine.rewards.vlm:VlmYesNoReward",  # 100*sigmoid(logit Yes - logit No) of an in-process VLM
    "vlm_alignment": "engine.rewards.vlm:vlm_alignment",  # FDFO's trained question (its official presets)
    "vlm_quality": "engine.rewards.vlm:vlm_quality",
    "vlm_photo": "engine.rewards.vlm:vlm_photo",
    "openai_judge": "engine.rewards.openai_judge:OpenAIJudgeReward",  # a served judge (vLLM, sglang chat API)
})
register = REWARDS.register  # register(name, "module:callable" or a factory)
BACKENDS = ("local", "async", "remote")


@dataclass
class RewardSpec:
    """One reward of the trained combination (an entry of the config's ``rewards:`` list)."""

    name: str = opt("testbed_geneval", "reward: a registered name (engine.rewards.REWARDS) or 'module:callable'")
    weight: float = opt(1.0, "weight in the trained total")
    backend: str = opt("local", "local (in-process) | async (in-process, scored in background threads) | remote "
                                "(an HTTP reward server; kwargs are then RemoteReward's: url, timeout, retries, ...)")
    kwargs: dict = opt({}, "the reward constructor's keyword arguments")
    key: str = opt("", "key of this component in the logged scores ('' = name; set it to use one reward twice)")
    async_workers: int = opt(1, "threads of the async backend")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "rewards") -> "RewardSpec":
        if isinstance(d, RewardSpec):
            d.validate(where)
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a mapping with keys name, weight, backend, kwargs; got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown} (expected some of {sorted(known)})")
        if "name" not in d:
            raise ConfigError(f"{where}: missing 'name' (one of {', '.join(REWARDS.names())})")
        spec = cls(**{k: ("" if k == "key" and v is None else v) for k, v in d.items()})
        spec.validate(where)
        return spec

    def validate(self, where: str = "rewards") -> None:
        """ConfigError (one sentence naming ``where``) unless every field is usable."""
        if not isinstance(self.name, str) or self.name not in REWARDS:
            raise ConfigError(f"{where}: unknown reward {self.name!r}; registered: {', '.join(REWARDS.names())} "
                              f"(or a 'module:callable' path to your own)")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ConfigError(f"{where}: weight of {self.name!r} must be a finite number, got {self.weight!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where}: backend of {self.name!r} must be one of {', '.join(BACKENDS)}, "
                              f"got {self.backend!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ConfigError(f"{where}: kwargs of {self.name!r} must be a mapping, got {type(self.kwargs).__name__}")
        if not isinstance(self.key, str):
            raise ConfigError(f"{where}: key of {self.name!r} must be a string, got {self.key!r}")
        if isinstance(self.async_workers, bool) or not isinstance(self.async_workers, int) or self.async_workers < 1:
            raise ConfigError(f"{where}: async_workers of {self.name!r} must be an integer >= 1")


def resolve(name: str) -> Callable[..., Reward]:
    """The factory registered under ``name`` or at the ``"module:callable"`` path ``name`` (imported now)."""
    return REWARDS.get(name)


def build_reward(spec: RewardSpec | Mapping[str, Any]) -> Reward:
    """One reward from its spec, wrapped for its backend."""
    spec = RewardSpec.from_dict(spec)
    if spec.backend == "remote":
        from .remote import RemoteReward
        # the server must serve this reward (kwargs may override with "name": None to accept any)
        return RemoteReward(**{"name": spec.name, **dict(spec.kwargs)})
    try:
        reward = resolve(spec.name)(**dict(spec.kwargs))
    except TypeError as e:
        raise ConfigError(f"reward {spec.name!r}: bad kwargs {sorted(spec.kwargs)}: {e}") from e
    if spec.backend == "async":
        from .async_backend import AsyncRewards
        reward = AsyncRewards(reward, max_workers=spec.async_workers)
    return reward


def build_rewards(specs: Sequence[RewardSpec | Mapping[str, Any]]) -> RewardSet:
    """``[{name, weight, backend, kwargs}, ...] -> RewardSet`` (the weighted total is the trained reward)."""
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence) or not specs:
        raise ConfigError(f"rewards: expected a non-empty list of reward specs, got {specs!r}")
    parsed = [RewardSpec.from_dict(s, f"rewards[{i}]") for i, s in enumerate(specs)]
    return RewardSet([WeightedReward(build_reward(s), float(s.weight), s.key or s.name) for s in parsed])
