"""User-facing errors, and how a command reports them.

Everything a user can get wrong (a bad path, an unsupported config, a corrupt file, a bad
sampling parameter) raises `MiniCPMError` with a message that names the problem. A command
(`run_reporting_errors`) prints that message as one line; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any


class MiniCPMError(Exception):
    """An error caused by input: a message for the user, not a bug."""


class ConfigError(MiniCPMError, ValueError):
    """config.json (or GGUF metadata) describes something we cannot build."""


class CheckpointError(MiniCPMError):
    """A weights file is missing, corrupt, or does not fit the config."""


def run_reporting_errors(action: Callable[[Any], int], args: Any) -> int:
    """`action(args)` as a command: an error caused by input (or a file that cannot be read or
    written) prints one line `error: ...` and exits 2; Ctrl-C exits 130; warnings print as
    `warning: ...`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
            return action(args)
    except (MiniCPMError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
