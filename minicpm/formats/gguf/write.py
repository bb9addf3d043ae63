"""Writing a GGUF file that llama.cpp runs: architecture `minicpm` for MiniCPM configs, `llama`
for Llama configs.

`plan_tensors` lays the checkpoint out as GGUF tensors (names, rotary row order, stacked experts:
layout.py) with the type each is stored as (file_types.py); `write_gguf` writes the metadata
(metadata.py), then converts and writes one tensor at a time (quantize.py).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, ConfigError
from minicpm.files import atomic_file
from minicpm.formats.gguf.file_types import FILE_TYPES, weight_type
from minicpm.formats.gguf.layout import (
    EXPERT_NAMES,
    hf_to_gguf_name,
    interleave_rope_rows,
    rope_heads,
)
from minicpm.formats.gguf.metadata import add_model_metadata, add_tokenizer_metadata
from minicpm.formats.gguf.quantize import encode_tensor

logger = logging.getLogger(__name__)

__all__ = ["write_gguf", "plan_tensors", "PlannedTensor"]


@dataclass
class PlannedTensor:
    """One tensor of the output file: its GGUF name, element shape, type and how to make it."""
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]


def write_gguf(config: MiniCPMConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
               tokenizer: Any, path: str | os.PathLike, file_type: str = "f16",
               name: str | None = None, progress: bool = False) -> Path:
    """Write a GGUF file llama.cpp runs; returns its path.

    `named_tensors`: HF names (a state dict's items). `tokenizer`: an object with
    `to_gguf_metadata()` or a dict of `tokenizer.*` keys (None writes no tokenizer; llama.cpp
    then refuses the file). `file_type`: f32, f16, bf16, q8_0, q4_0, q4_k_m, q6_k for the 2-D
    weights; 1-D tensors (norms) and the MoE router stay F32. In q4_0 files the output matrix
    (`output.weight`, or `token_embd.weight` when tied) is Q6_K (Q8_0 for rows that are not whole
    super-blocks), keeping the head finer as llama.cpp's quantizer does; q4_k_m chooses per tensor as llama.cpp's Q4_K_M does (see
    `file_types.q4_k_m_type`). Rows whose length is not a multiple of the block size fall back
    as in llama.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and a 32-value type -> F16.
    `progress`: a progress bar (weights written) on stderr.
    The file appears at `path` only when complete (written to a temporary name, then renamed).
    The tensors are gathered first (the header lists every shape before any data; a state dict
    costs no copy), then converted and written one at a time.
    """
    import gguf

    if file_type not in FILE_TYPES:
        raise ConfigError(f"GGUF file type {file_type!r} is not supported; "
                          f"supported: {', '.join(FILE_TYPES)}")
    _check_writable(config)
    arch = "minicpm" if config.model_type == "minicpm" else "llama"
    plan = plan_tensors(config, dict(named_tensors), file_type)
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            add_model_metadata(writer, config, arch, file_type, name)
            add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
            _write_tensors(writer, plan, progress, desc=f"writing {path.name}")
            writer.flush()
            for handle in writer.fout or []:  # on disk before the rename makes it visible
                os.fsync(handle.fileno())
        finally:
            writer.close()
    return path


def _write_tensors(writer, plan: list[PlannedTensor], progress: bool, desc: str) -> None:
    """The tensor directory, then the data: one tensor converted and in memory at a time."""
    import gguf
    from tqdm import tqdm

    for item in plan:
        block, type_size = gguf.GGML_QUANT_SIZES[item.qtype]
        nbytes = int(np.prod(item.shape)) * type_size // block
        writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), nbytes,
                               raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(math.prod(item.shape) for item in plan)
    with tqdm(total=total, desc=desc, unit="w", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for item in plan:
            done = bar.n
            writer.write_tensor_data(encode_tensor(item.produce(), item.qtype, bar.update))
            bar.update(math.prod(item.shape) - (bar.n - done))


def _check_writable(config: MiniCPMConfig) -> None:
    """Refuse what llama.cpp's llama/minicpm graphs would silently compute differently."""
    if config.hidden_act != "silu":
        raise ConfigError(f"llama.cpp's {config.model_type} graph only implements SiLU; "
                          f"hidden_act {config.hidden_act!r} cannot be written to GGUF")
    if config.sliding_window:
        logger.warning("llama.cpp's llama graph has no sliding window; it attends to the whole "
                       "context (sliding_window %s is kept only in hf.config)",
                       config.sliding_window)



_EXPERT_PATTERN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w[123])\.weight")
_STACKED_NAME = {hf.split(".")[-2]: g for g, hf in EXPERT_NAMES.items()}  # w1 -> ffn_gate_exps


def plan_tensors(config: MiniCPMConfig, tensors: dict[str, torch.Tensor],
                 file_type: str) -> list[PlannedTensor]:
    """GGUF tensors in checkpoint order, each with a function that converts it when written."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:
        raise CheckpointError("untied config but no lm_head.weight among the tensors")
    stacks = _expert_stacks(config, tensors)
    plan: list[PlannedTensor] = []
    placed: set[str] = set()
    unknown = []
    for hf_name, tensor in tensors.items():
        match = _EXPERT_PATTERN.fullmatch(hf_name)
        if match:
            gguf_name = _STACKED_NAME[match[3]].format(match[1])
            if gguf_name in placed:
                continue  # one stacked tensor per layer, placed where its first expert was
            placed.add(gguf_name)
            parts = stacks[gguf_name]
            shape, produce = (len(parts), *parts[0].shape), functools.partial(torch.stack, parts)
        else:
            gguf_name = hf_to_gguf_name(hf_name)
            if gguf_name is None:
                unknown.append(hf_name)
                continue
            heads = rope_heads(gguf_name, config)
            shape = tensor.shape
            if heads is not None:
                produce = functools.partial(interleave_rope_rows, tensor, heads)
            else:
                produce = functools.partial(torch.Tensor.detach, tensor)
        shape = tuple(int(n) for n in shape)
        qtype = weight_type(gguf_name, shape, config, file_type)
        plan.append(PlannedTensor(gguf_name, shape, qtype, produce))
    if unknown:
        raise CheckpointError(f"no GGUF name for tensor(s): {', '.join(sorted(unknown)[:8])}")
    plan.extend(_rope_freqs_tensor(config))
    return plan


def _expert_stacks(config: MiniCPMConfig, tensors: dict[str, torch.Tensor]
                   ) -> dict[str, list[torch.Tensor]]:
    """Stacked GGUF name -> the per-expert tensors in expert order (all experts required)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, tensor in tensors.items():
        match = _EXPERT_PATTERN.fullmatch(hf_name)
        if match:
            groups.setdefault(_STACKED_NAME[match[3]].format(match[1]), {})[int(match[2])] = tensor
    expected = list(range(config.num_experts))
    for gguf_name, members in groups.items():
        if sorted(members) != expected:
            raise CheckpointError(f"{gguf_name}: experts {sorted(members)} present, config has "
                                  f"num_experts {config.num_experts}")
    return {name: [members[e] for e in expected] for name, members in groups.items()}


def _rope_freqs_tensor(config: MiniCPMConfig) -> list[PlannedTensor]:
    """llama3 rope scaling: llama.cpp divides each rotary frequency by a stored factor."""
    from gguf import GGMLQuantizationType as T

    if not config.rope_scaling or config.rope_scaling.get("rope_type") != "llama3":
        return []
    from minicpm.model import RotaryEmbedding

    def factors() -> torch.Tensor:
        dim = config.head_dim
        plain = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return plain / RotaryEmbedding(config).inv_freq

    return [PlannedTensor("rope_freqs.weight", (config.head_dim // 2,), T.F32, factors)]

