"""Rewards: one protocol (``base.Reward``), a weighted combination (``RewardSet``), local/async/remote backends, and
the reward models users train against (OCR, GenEval, CLIP score, PickScore, HPS, aesthetic, ImageReward)."""
from .async_backend import AsyncRewards
from .base import Detection, Detector, Reward
from .combine import RewardSet, WeightedReward
from .registry import REWARDS, RewardSpec, build_reward, build_rewards, register
from .remote import RemoteReward, RemoteRewardError, RemoteRewardUnavailable
from .unseen import UnseenMetrics, evaluate_unseen

__all__ = ["AsyncRewards", "Detection", "Detector", "Reward", "RewardSet", "WeightedReward", "REWARDS",
           "RewardSpec", "build_reward", "build_rewards", "register", "RemoteReward", "RemoteRewardError",
           "RemoteRewardUnavailable", "UnseenMetrics", "evaluate_unseen"]
