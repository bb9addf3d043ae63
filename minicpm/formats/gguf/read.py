"""Reading a GGUF file into our model: config from its metadata, tensors in Hugging Face layout.

The file is memory-mapped (container.py) and converted one tensor at a time (quantized blocks
dequantized to float32, F16/BF16 kept as they are), so a large file is never duplicated in memory.
Every tensor is checked to be one we can produce before anything is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError
from minicpm.formats.gguf.container import GGUFFile
from minicpm.formats.gguf.dequantize import can_dequantize, to_torch
from minicpm.formats.gguf.layout import (
    deinterleave_rope_rows,
    expert_template,
    gguf_to_hf_name,
    rope_heads,
)
from minicpm.formats.gguf.metadata import (
    HF_CONFIG_KEY,
    SUPPORTED_ARCHITECTURES,
    config_from_metadata,
)

__all__ = ["read_gguf", "read_gguf_info", "load_gguf", "open_gguf"]


def read_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None
              ) -> tuple[MiniCPMConfig, Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Open a GGUF file: (config, lazy (HF name, tensor) pairs in HF layout, metadata).

    The tensors are produced one by one from the memory-mapped file (a single pass): quantized
    ones dequantized to float32, F32/F16/BF16 as stored, each cast to `dtype` if given.
    `metadata` maps every GGUF key to its Python value (tokenizer lists included).
    """
    file, config, metadata = open_gguf(path)
    return config, _iter_tensors(file, config, dtype), metadata


def read_gguf_info(path: str | os.PathLike) -> tuple[MiniCPMConfig, list[str]]:
    """(config, stored type name of every tensor) without touching tensor data (`inspect`)."""
    file, config, _metadata = open_gguf(path)
    return config, [t.tensor_type.name for t in file.tensors]


def open_gguf(path: str | os.PathLike) -> tuple[GGUFFile, MiniCPMConfig, dict[str, Any]]:
    """(file, config, metadata), with every tensor checked to be one we can produce."""
    path = Path(path)
    file = _open_file(path)
    metadata = file.metadata
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = [t.name for t in file.tensors]
    config = config_from_metadata(metadata, tied="output.weight" not in names, source=str(path))
    _check_tensors(file)
    return file, config, metadata


def load_gguf(path: str | os.PathLike, dtype: Any = None, device: Any = None):
    """(model, tokenizer) from a GGUF file; dtype defaults to float32."""
    from minicpm.loading.assemble import build_model
    from minicpm.tokenizer import Tokenizer

    config, tensors, metadata = read_gguf(path)
    tokenizer_meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.model" not in tokenizer_meta:
        raise CheckpointError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.* keys)")
    tokenizer = Tokenizer.from_gguf_metadata(tokenizer_meta)
    model = build_model(config, tensors, dtype=torch.float32 if dtype is None else dtype,
                        device=device, source=str(path))
    return model, tokenizer


def _open_file(path: Path) -> GGUFFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    return GGUFFile(path)  # our own parser: see container.py for why not gguf.GGUFReader


def _check_tensors(file: GGUFFile) -> None:
    """Fail before building anything: unknown names or block types gguf-py cannot decode."""
    from gguf import GGMLQuantizationType as T

    path = file.path
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            if HF_CONFIG_KEY not in file.metadata:
                raise CheckpointError(
                    f"{path}: tensor rope_freqs.weight (llama3-style rope frequency factors) is "
                    "not supported without the hf.config key that records the rope scaling")
            continue
        if expert_template(t.name) is None and gguf_to_hf_name(t.name) is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (type {t.tensor_type.name})")
        if not can_dequantize(int(t.tensor_type)):
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                                  "gguf-py cannot dequantize")
        if file.byte_order == ">" and t.tensor_type not in (T.F32, T.F16):
            # gguf-py's block decoders assume little-endian scales; F32/F16 we can swap.
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                                  "is not supported in a big-endian GGUF file")


def _iter_tensors(file: GGUFFile, config: MiniCPMConfig,
                  dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            continue  # recomputed from the rope scaling in hf.config
        data = file.tensor_data(t)
        stacked = expert_template(t.name)
        if stacked is not None:
            hf_template, layer = stacked
            for expert in range(data.shape[0]):  # dequantize one expert at a time
                tensor = to_torch(data[expert], t.tensor_type)
                yield hf_template.format(layer, expert), _cast(tensor, dtype)
            continue
        tensor = to_torch(data, t.tensor_type)
        heads = rope_heads(t.name, config)
        if heads is not None:
            tensor = deinterleave_rope_rows(tensor, heads)
        yield gguf_to_hf_name(t.name), _cast(tensor, dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)

