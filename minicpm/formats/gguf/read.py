"""Reading a GGUF file into our model: config from its metadata, tensors in Hugging Face layout.

The file is memory-mapped (container.py) and converted one tensor at a time, so a large file is
never duplicated in memory. Every tensor is checked to be one we can produce before anything is
built. Two ways to load:
  as stored (`load_gguf` without a dtype): 2-D Q4_0/Q4_1/Q8_0/Q4_K/Q6_K weights become
      QuantizedLinear layers holding the file's blocks exactly (repack.py), run by the int4/int8
      kernel; a quantized token_embd becomes the head plus a QuantizedEmbedding (tied) or an
      embedding of its own quantized rows. Other block types are dequantized to float32 with a
      warning that names them and their cost. Float tensors become float32.
  float (`read_gguf`, `load_gguf(dtype=...)`): every tensor dequantized to float32 (F16/BF16 as
      stored), then cast to the dtype.
"""

from __future__ import annotations

import logging
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
    gguf_tokenizer,
)

__all__ = ["read_gguf", "read_gguf_info", "load_gguf", "open_gguf"]

log = logging.getLogger(__name__)
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


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
    """(model, tokenizer) from a GGUF file: quantized weights as stored when no dtype is given
    (float parts in float32), else every tensor dequantized and cast to `dtype`."""
    from minicpm.loading.assemble import build_model, one_thread

    file, config, metadata = open_gguf(path)
    tokenizer = gguf_tokenizer(metadata, path)
    if dtype is not None:
        return build_model(config, _iter_tensors(file, config, None), dtype=dtype, device=device,
                           source=str(path)), tokenizer
    layers: dict[str, list] = {}
    with one_thread():
        model = build_model(config, _iter_stored(file, config, layers), dtype=torch.float32, device=device,
                            source=str(path))
    if layers:  # what save_pretrained records, so that a saved copy loads back to the same layers
        model.config = model.config.replace(quantization=stored_record(config, layers))
    return model, tokenizer


def stored_record(config: MiniCPMConfig, layers: dict[str, list]) -> dict[str, Any]:
    """The `config.quantization` record of a model loaded as stored: its layers listed one by one
    ({module: [bits, group]}), since a GGUF file mixes types."""
    head = "int8" if "lm_head" in layers or (config.tie_word_embeddings and "model.embed_tokens" in layers) else "bf16"
    if config.tie_word_embeddings and "model.embed_tokens" in layers:
        layers = {("lm_head" if k == "model.embed_tokens" else k): v for k, v in layers.items()}
        embedding = "head"
    else:
        embedding = "table" if "model.embed_tokens" in layers else "float"
    return {"method": "gguf", "layers": layers, "head": head, "embedding": embedding}


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
        for name, tensor in _converted(file, t, config, expert_template(t.name)):
            yield name, _cast(tensor, dtype)


def _iter_stored(file: GGUFFile, config: MiniCPMConfig, layers: dict[str, list]
                 ) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor or ready module): repackable 2-D weights as QuantizedLinear (recorded in
    `layers` as {module: [bits, group]}), other block types dequantized (one warning), floats fp32."""
    from minicpm.formats.gguf.repack import REPACKED_TYPES, repacked_linear
    from minicpm.loading.assemble import release_freed_memory
    from minicpm.quantization.embedding import QuantizedEmbedding

    dequantized: dict[str, list[int]] = {}  # type -> [tensors, float bytes]
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            continue
        kind = t.tensor_type.name
        stacked = expert_template(t.name)
        if kind in _FLOAT_TYPES or (kind not in REPACKED_TYPES) or len(t.shape) == 1:
            if kind not in _FLOAT_TYPES:
                counts = dequantized.setdefault(kind, [0, 0])
                counts[0] += 1
                counts[1] += 4 * int(t.n_elements)
            for name, tensor in _converted(file, t, config, stacked):
                yield name, tensor.to(torch.float32, copy=True)  # a copy: the file's pages are released
            file.release(t)
            continue
        data = file.tensor_data(t)
        if stacked is not None:  # one layer per expert, each from its own rows of blocks
            hf_template, index = stacked
            for expert in range(data.shape[0]):
                name, layer = hf_template.format(index, expert), repacked_linear(data[expert], kind)
                layers[name.removesuffix(".weight")] = _record(layer)
                yield name, layer
            file.release(t)
            release_freed_memory()
            continue
        heads = rope_heads(t.name, config)
        rows = None if heads is None else (lambda x, h=heads: deinterleave_rope_rows(x, h))
        layer = repacked_linear(data, kind, rows)
        name = gguf_to_hf_name(t.name)
        layers[name.removesuffix(".weight")] = _record(layer)
        if name == "model.embed_tokens.weight":
            tied = config.tie_word_embeddings
            if tied:
                yield "lm_head.weight", layer
            yield name, QuantizedEmbedding(layer, owned=not tied)
        else:
            yield name, layer
        file.release(t)
        release_freed_memory()  # the repacking temporaries
    if dequantized:
        parts = ", ".join(f"{k} ({n} tensors)" for k, (n, _) in sorted(dequantized.items()))
        total = sum(b for _, b in dequantized.values())
        log.warning("%s: no kernel runs %s as stored: dequantized to float32 (%.1f MB)", file.path, parts,
                    total / 1e6)


def _record(layer) -> list:
    return [layer.bits, layer.group_size]


def _converted(file: GGUFFile, t, config: MiniCPMConfig, stacked) -> Iterator[tuple[str, torch.Tensor]]:
    """One GGUF tensor as float HF tensors (dequantized if a block type; experts one by one)."""
    data = file.tensor_data(t)
    if stacked is not None:
        hf_template, layer = stacked
        for expert in range(data.shape[0]):  # dequantize one expert at a time
            yield hf_template.format(layer, expert), to_torch(data[expert], t.tensor_type)
        return
    tensor = to_torch(data, t.tensor_type)
    heads = rope_heads(t.name, config)
    if heads is not None:
        tensor = deinterleave_rope_rows(tensor, heads)
    yield gguf_to_hf_name(t.name), tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)

