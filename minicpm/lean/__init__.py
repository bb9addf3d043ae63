"""The lean runtime: quantized GGUF models run by the native kernels from numpy, without PyTorch.

`import torch` alone is ~220 MB resident, more than twice the default model's weights; this
runtime is numpy (~15 MB), the tokenizer and three C kernels (qgemm.c, attention.c, decode.c),
so `minicpm chat` on the default model peaks near 200 MB instead of 420 (docs/speed.md). It runs
decoder-only GGUF files whose 2-D weights are block types the int4/int8 kernel reads as stored
(Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K), with an fp32, fp16, bf16, int8 or int4 KV cache, on x86-64 CPUs with AVX2; anything else (float or MoE
checkpoints, rope scaling, images, a GPU) runs on the PyTorch model, which is the reference:
tests hold the two to the same logits.

    from minicpm import lean
    model, tokenizer = lean.load("model.Q4_1.gguf")
    chat = lean.LeanChat(model, tokenizer, system=None)
"""

from __future__ import annotations

from pathlib import Path

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError
from minicpm.formats.gguf.container import GGUFFile
from minicpm.formats.gguf.metadata import gguf_tokenizer
from minicpm.kernels.allocator import return_free_heap
from minicpm.kernels.build import KernelUnavailable
from minicpm.lean.cache import cache_kind
from minicpm.lean.chat import LeanChat, stream_reply
from minicpm.lean.model import LeanModel, default_threads, file_config, read_weights, unsupported
from minicpm.lean.native import kernels
from minicpm.tokenizer import Tokenizer

__all__ = ["load", "why_not", "LeanModel", "LeanChat", "stream_reply"]


def why_not(path: str | Path) -> str | None:
    """Why the lean runtime cannot run the checkpoint at `path` (None: it can). Reads headers only;
    a GGUF file no runtime reads (corrupt, another architecture) raises CheckpointError."""
    return _opened(Path(path))[0]


def _opened(path: Path) -> tuple[str | None, GGUFFile | None, MiniCPMConfig | None]:
    """(why not, None, None) or (None, the opened file, its config)."""
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return "it runs GGUF files only", None, None
    try:
        kernels()
    except KernelUnavailable as e:
        return f"its native kernels are unavailable ({e})", None, None
    file = GGUFFile(path)
    config = file_config(file)
    reason = unsupported(file, config)
    return (None, file, config) if reason is None else (f"it does not run {reason}", None, None)


def load(path: str | Path, threads: int | None = None, kv_cache: str = "auto",
         head: str = "stored") -> tuple[LeanModel, Tokenizer]:
    """(model, tokenizer) of a GGUF file, its KV cache fp16 ("auto" or "f16"), "fp32", "bf16", "int8" or "int4", its
    output head as stored or ("int4") rounded again to int4 groups of 32 (about half the memory
    of a Q6_K head); CheckpointError says what the runtime cannot run."""
    path = Path(path)
    cache_kind(kv_cache)  # a wrong name before the weights are read
    reason, file, config = _opened(path)
    if reason is not None:
        raise CheckpointError(f"{path}: the lean runtime cannot run this checkpoint: {reason}")
    tokenizer = gguf_tokenizer(file.metadata, path)
    for key in [k for k in file.metadata if k.startswith("tokenizer.")]:
        del file.metadata[key]  # the vocabulary lists, now in the tokenizer (tens of MB of Python objects)
    model = LeanModel(config, read_weights(file, config, kernels(), head), kernels(), threads or default_threads(),
                      kv_cache)
    return_free_heap()
    return model, tokenizer
