"""Checkpoint formats: Hugging Face directories (`hf`), GGUF files (`gguf`), the llama-format
export (`llama`), ollama Modelfiles (`ollama`), other tools' quantized checkpoints (`published`:
GPTQ, AWQ, bitsandbytes), conversion between them (`convert`) and a checkpoint's description
from its headers (`info`).

`load_checkpoint` opens whatever `minicpm.loading.locate` finds with the reader of its format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minicpm.loading import locate


def load_checkpoint(path_or_id: str | Path | None = None, dtype: Any = None, device: Any = None):
    """(model, tokenizer) for a checkpoint directory, a .gguf file or a hub id."""
    path = locate(path_or_id)
    if device is None or str(device).startswith("cpu"):
        from minicpm.kernels.libraries import prebuild_once

        prebuild_once()  # a cold cache compiles while the weights load, not one kernel after another
    if path.is_file():
        from minicpm.formats.gguf import load_gguf

        return load_gguf(path, dtype=dtype, device=device)
    from minicpm.formats.published import load_published_checkpoint, published_of

    published = published_of(path)  # GPTQ, AWQ, bitsandbytes: repacked for our kernels at load
    if published is not None:
        return load_published_checkpoint(path, published, dtype=dtype, device=device)
    from minicpm.formats.hf import load_pretrained

    return load_pretrained(path, dtype=dtype, device=device)
