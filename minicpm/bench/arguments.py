"""Command-line numbers of the benchmark scripts (benchmarks/*.py): a clear one-line refusal of
a bad value instead of a traceback in a child process minutes later."""

from __future__ import annotations

import argparse
from pathlib import Path


def count(minimum: int, what: str, k: bool = False):
    """An argparse type: a whole number >= `minimum`; with `k`, "16k" is 16 x 1024 too (lengths)."""
    def parse(spec: str) -> int:
        text = spec.strip().lower()
        try:
            n = int(float(text[:-1]) * 1024) if k and text.endswith("k") else int(text)
        except (ValueError, OverflowError):  # 'abc', 'infk'
            n = None
        if n is None or n < minimum:
            example = " (k = 1024: 16k is 16384)" if k else ""
            raise argparse.ArgumentTypeError(f"{what} takes a whole number >= {minimum}{example}, not {spec!r}")
        return n
    return parse


def folder(spec: str) -> Path:
    """An argparse type: a folder, existing or to be made (not an existing file)."""
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{spec} is a file; give a folder")
    return path
