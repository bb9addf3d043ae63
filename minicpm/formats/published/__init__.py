"""Quantized checkpoints that other tools publish: GPTQ (AutoGPTQ v1, GPTQModel v2), AutoAWQ
GEMM and bitsandbytes 4-bit (NF4/FP4, double quant), read into our model; GPTQ v1 written.

  settings  which format a directory holds (config.json quantization_config, quantize_config.json)
            and the variants refused by name
  packing   int32 words of 4/8-bit codes (GPTQ's and AWQ's orders)
  layers    codes + scales + integer zero points -> QuantizedLinear (act-order: input permutation)
  gptq      GPTQ tensors <-> our layers;  awq: AWQ GEMM tensors -> our layers
  bnb       bitsandbytes 4-bit -> float weights (no integer form holds NF4's levels)
  load      the streaming loader (`load_published`)
  export    `minicpm convert --to gptq` (`write_gptq`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minicpm.formats.published.settings import Published, read_published

__all__ = ["Published", "load_published_checkpoint", "published_of", "read_published"]


def published_of(directory: Path) -> Published | None:
    """The published quantization of a checkpoint directory, or None (float, or our own)."""
    from minicpm.config import read_config_json

    raw = read_config_json(directory / "config.json")
    return read_published(directory, raw)


def load_published_checkpoint(directory: Path, published: Published, dtype: Any = None, device: Any = None):
    """(model, tokenizer or None) of a published quantized checkpoint directory.

    Without a dtype, the float parts (embedding, norms, head, activations) are float32 for GPTQ and
    AWQ, as a GGUF file loads as stored: these files say float16, which has no native decode step
    and slow matrix products on a CPU. A bitsandbytes model is all dequantized weights: bfloat16,
    half the memory."""
    if dtype is None:
        dtype = "bfloat16" if published.method == "bitsandbytes" else "float32"
    from minicpm.config import MiniCPMConfig
    from minicpm.errors import CheckpointError
    from minicpm.formats.published.load import load_published
    from minicpm.tokenizer import Tokenizer

    config = MiniCPMConfig.from_file(directory / "config.json")
    if config.model_type == "minicpmv":
        raise CheckpointError(f"{directory}: {published.method}-quantized MiniCPM-V checkpoints are not supported")
    model = load_published(directory, config, published, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(directory) if Tokenizer.exists(directory) else None
    return model, tokenizer
