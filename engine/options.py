"""The one config idiom: options are dataclass fields made by :func:`opt` (a default and a help line), and the
machinery that turns YAML and ``key=value`` overrides into those dataclasses.

Every section of a run's config - the engine's (``engine.config``, the schema) and each method's (``crd:``, ``nft:``,
``fdfo:``, ``didr:``) - declares its options with :func:`opt`, so ``train.py --help`` prints a description for all of
them (:func:`help_lines`). :func:`build_dataclass` type-checks a nested mapping against a dataclass (unknown keys and
wrong types are one ConfigError sentence naming the key); :func:`parse_override`, :func:`set_path`,
:func:`read_yaml` read recipes and overrides; :func:`to_dict` writes a config back. Schema-agnostic: this module
imports nothing of the engine but its error type, so methods and the schema both use it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from typing import Any

import yaml

from engine.errors import ConfigError


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with ``default`` (mutable defaults are deep-copied per instance) and its ``--help`` line."""
    if not help:
        raise ValueError("every option needs a help line")
    if isinstance(default, (list, dict, tuple)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


# ----------------------------------------------------------------------------------------------- type checking
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and mildly coerced: int -> float, '1e-4' -> float) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping of {tp.__name__} options, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r} has an invalid value {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if args:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls, values: dict, prefix: str = ""):
    """Instance of dataclass ``cls`` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r} in {where}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {prefix or cls.__name__!r}: {e}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_dict(obj) -> Any:
    """Plain nested dict/list of a config (for YAML dumps and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is parsed as YAML (``[1, 2]``, ``true``, ...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, p in enumerate(path[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key {'.'.join(path[: i + 1])!r} is not a section, cannot set "
                              f"{'.'.join(path)!r}")
        node = nxt
    node[path[-1]] = value


def read_yaml(path: str) -> dict:
    """The mapping in YAML file ``path`` (ConfigError when missing or not a mapping)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    return data


# ------------------------------------------------------------------------------------------------- --help text
def help_lines(cls, prefix: str = "") -> list[str]:
    """One line per option: ``key (type, default X): help`` — generated from the dataclasses."""
    lines = []
    hints = _hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(help_lines(tp, key))
            continue
        default = getattr(inst, f.name)
        if dataclasses.is_dataclass(default) or (isinstance(default, list) and default
                                                 and dataclasses.is_dataclass(default[0])):
            default = to_dict(default)
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {key} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
        item = (typing.get_args(tp) or [None])[0]
        if dataclasses.is_dataclass(item):  # a list of sections (rewards): its entries' options too
            lines.extend(help_lines(item, f"{key}[]"))
    return lines
