"""User-facing errors.

Everything a user can get wrong (a bad path, an unsupported config, a corrupt file, a bad
sampling parameter) raises `MiniCPMError` with a message that names the problem. The CLI prints
that message as one line; anything else is a bug and keeps its traceback.
"""


class MiniCPMError(Exception):
    """An error caused by input: a message for the user, not a bug."""


class ConfigError(MiniCPMError, ValueError):
    """config.json (or GGUF metadata) describes something we cannot build."""


class CheckpointError(MiniCPMError):
    """A weights file is missing, corrupt, or does not fit the config."""
