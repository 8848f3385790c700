"""The one idiom for a config option: a dataclass field with a default and a help line.

Every section of a run's config - the engine's (``engine.config``) and each method's (``crd:``, ``nft:``,
``fdfo:``, ``didr:``) - declares its options with :func:`opt`, so ``train.py --help`` prints a description for all of
them (``engine.config.help_lines``). This module imports nothing of the engine: methods and config both use it.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with ``default`` (mutable defaults are deep-copied per instance) and its ``--help`` line."""
    if not help:
        raise ValueError("every option needs a help line")
    if isinstance(default, (list, dict, tuple)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
