"""Test environment: CPU-only, offline, Triton through its interpreter (set before anything imports triton)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def register_reward():
    """``register_reward(name, "module:callable")`` adds a reward to the registry for one test (removed after)."""
    from engine.rewards import REWARDS

    added = []

    def add(name: str, target: str) -> None:
        assert name not in REWARDS.names(), f"{name!r} is a built-in reward; pick a test-only name"
        REWARDS.register(name, target)
        added.append(name)

    yield add
    for name in added:
        REWARDS.unregister(name)
