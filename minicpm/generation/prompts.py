"""Prompt bookkeeping that needs no PyTorch (shared with the torch-free runtime, `minicpm.lean`):
how much of a prompt a cache already holds, and a prompt cut to fit the context."""

from __future__ import annotations

import warnings

__all__ = ["common_prefix", "fit_prompt"]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fit_prompt(prompt: list[int], context: int) -> list[int]:
    """Keep the last tokens of a prompt that leaves no room to generate, and say what was cut."""
    keep = context - 1
    if len(prompt) <= keep:
        return prompt
    warnings.warn(f"prompt has {len(prompt)} tokens but the context holds {context}; "
                  f"dropped the first {len(prompt) - keep} tokens", stacklevel=4)
    return prompt[-keep:]
