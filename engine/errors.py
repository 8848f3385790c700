"""The engine's user-facing error types, in a module that imports nothing (every layer may raise them)."""


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, impossible value or batch arithmetic (exit code 2)."""
