"""One registry idiom for methods, rewards and model families.

A :class:`Registry` maps a name to an object (a class or a factory). Built-in entries are ``"module:attribute"``
strings imported only when first used, so listing names never imports torch code or optional dependencies. Any
``"module:attribute"`` string that is not a registered name is imported directly, so a YAML recipe plugs in a user's
own code without editing engine files::

    model: {family: mypkg.models:MyFlow}
    rewards: [{name: mypkg.rewards:score}]
    method: mypkg.methods:MyMethod

Lookups of unknown names, unimportable modules and missing attributes raise :class:`~engine.errors.ConfigError`
with one sentence naming the kind of entry and what is registered.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from engine.errors import ConfigError


def is_import_path(name: str) -> bool:
    """``"pkg.module:attr"``: a module path, one colon, an attribute path."""
    mod, sep, attr = name.partition(":")
    return bool(sep and mod and attr and ":" not in attr)


def import_path(path: str, kind: str = "entry") -> Any:
    """The object at ``"module:attr.sub"`` (ConfigError naming ``kind`` when the module or attribute is missing)."""
    mod, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and (mod == e.name or mod.startswith(e.name + ".")):
            raise ConfigError(f"{kind} {path!r}: module {mod!r} cannot be imported (not on the Python path)") from None
        raise
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{kind} {path!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry:
    """Names -> objects for one ``kind`` of entry ("method", "reward", "model family")."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._paths: dict[str, str] = dict(builtins or {})
        self._objects: dict[str, Any] = {}

    def register(self, name: str, target: Any = None) -> Callable[[Any], Any] | Any:
        """``register(name, obj_or_"module:attr")``, or ``@register(name)`` as a decorator. Re-registering a name
        replaces its entry (tests and plug-ins may override a built-in on purpose)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigError(f"{self.kind} names must be non-empty strings without ':', got {name!r}")

        def add(obj: Any) -> Any:
            self._objects.pop(name, None)
            self._paths.pop(name, None)
            if isinstance(obj, str):
                if not is_import_path(obj):
                    raise ConfigError(f"{self.kind} {name!r}: {obj!r} is not a 'module:attribute' path")
                self._paths[name] = obj
            else:
                self._objects[name] = obj
            return obj

        return add if target is None else add(target)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a no-op when absent; for tests and plug-ins that register temporarily)."""
        self._objects.pop(name, None)
        self._paths.pop(name, None)

    def names(self) -> list[str]:
        return sorted(set(self._paths) | set(self._objects))

    def __contains__(self, name: str) -> bool:
        return name in self._objects or name in self._paths or (isinstance(name, str) and is_import_path(name))

    def get(self, name: str) -> Any:
        """The object registered as ``name``, or imported from a ``"module:attr"`` path."""
        if name in self._objects:
            return self._objects[name]
        if name in self._paths:
            obj = import_path(self._paths[name], self.kind)
            self._objects.setdefault(name, obj)
            return self._objects[name]
        if isinstance(name, str) and is_import_path(name):
            return import_path(name, self.kind)
        raise ConfigError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())} "
                          f"(or a 'module:attribute' path to your own)")
