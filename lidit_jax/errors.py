"""Errors every layer may raise; at the bottom of the import graph so that any module can."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""
