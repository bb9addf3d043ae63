"""Generation: sampling, the lockstep token generator, text streaming with stop strings, chat,
and `generate()`/`chat()` as methods of the model (`methods`, which `minicpm.load` imports).

The names below are imported on first use: `params` (SamplingParams), `text` (stop strings,
incremental text, GenerationStats) and `chat_params` need no PyTorch, so the torch-free runtime
(`minicpm.lean`) shares them; the generator, the sampler and the methods do.
"""

from __future__ import annotations

import importlib

# (`generate` and `chat` are submodules: the functions are minicpm.generation.generate.generate
# and minicpm.generation.chat.chat, or the model's methods)
_WHERE = {"TokenGenerator": "generate", "Sampler": "sampling", "SamplingParams": "params", "sample_next": "sampling"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
