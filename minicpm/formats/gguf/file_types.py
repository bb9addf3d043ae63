"""Which GGML type each tensor is stored as, for a requested file type (`write_gguf(file_type=)`).

1-D tensors (norms) and the MoE router stay F32. In q4_0 files the output matrix
(`output.weight`, or `token_embd.weight` when tied) is Q6_K, or Q8_0 where its rows are not whole
Q6_K super-blocks (SmolLM2's 576), as llama.cpp's quantizer does (llama-quant.cpp: the output
tensor of any quantized ftype other than the IQ*/MXFP4 ones becomes Q6_K unless the row is not a
multiple of the ftype's own block, then tensor_type_fallback turns Q6_K into Q8_0 for rows that
are not multiples of 256); q4_k_m chooses per tensor as llama.cpp's Q4_K_M does
(`q4_k_m_type`): on the same weights both give the same types. Rows whose length is not a
multiple of the block size fall back as in llama.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
and a 32-value type -> F16.
"""

from __future__ import annotations

import re

from minicpm.config import MiniCPMConfig

__all__ = ["FILE_TYPES", "weight_type", "q4_k_m_type"]

# write_gguf(file_type=...) -> (GGML type of 2-D weights, general.file_type value = llama_ftype)
FILE_TYPES = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "q4_k_m": ("Q4_K", 15),  # llama.cpp's Q4_K_M mix: Q4_K, Q6_K where it matters (q4_k_m_type)
    "q6_k": ("Q6_K", 18),
}
# llama.cpp's replacement when a row is not a whole number of blocks (tensor_type_fallback in
# llama-quant.cpp): a 32-value type of about the same precision; F16 if even that does not fit.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def weight_type(gguf_name: str, shape: tuple[int, ...], config: MiniCPMConfig, file_type: str):
    """The GGML type one tensor is stored as, given the requested file type."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or gguf_name.endswith("ffn_gate_inp.weight"):
        return T.F32  # llama.cpp keeps norms (and the router) in F32
    wanted = FILE_TYPES[file_type][0]
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    if file_type == "q4_k_m":
        wanted = q4_k_m_type(gguf_name, shape, config)
    elif wanted == "Q4_0" and gguf_name == head:
        wanted = "Q6_K"  # -> Q8_0 below when the row is not whole super-blocks
    row = shape[-1]
    if row % GGML_QUANT_SIZES[T[wanted]][0] and wanted in _FALLBACK:
        wanted = _FALLBACK[wanted]
    if row % GGML_QUANT_SIZES[T[wanted]][0]:
        return T.F16  # rows must hold whole quantization blocks
    return T[wanted]


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers for a finer type in the _M mixes: the first and last eighth,
    and every third layer in between."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def q4_k_m_type(gguf_name: str, shape: tuple[int, ...], config: MiniCPMConfig) -> str:
    """The type llama.cpp's `llama_tensor_get_type` (llama-quant.cpp, LLAMA_FTYPE_MOSTLY_Q4_K_M,
    no importance matrix, no overrides) gives a 2-D/3-D weight of a llama/minicpm model, before
    the fallback for rows that are not whole blocks."""
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    if gguf_name == head:  # the output matrix (shared with the embedding when tied)
        return "Q8_0" if shape[-1] % 256 else "Q6_K"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+?)(?:_exps)?\.weight", gguf_name)
    if match is None:
        return "Q4_K"  # the untied token embedding
    layer, role = int(match[1]), match[2]
    n_layers = config.num_hidden_layers
    eight_experts = config.num_experts == 8  # llama.cpp tunes Mixtral-like 8-expert models
    if role == "attn_v":
        if eight_experts:
            return "Q8_0"
        return "Q6_K" if _use_more_bits(layer, n_layers) else "Q4_K"
    if role == "attn_k" and eight_experts:
        return "Q8_0"
    if role == "attn_output" and eight_experts:
        return "Q5_K"
    if role == "ffn_down" and _use_more_bits(layer, n_layers):
        return "Q6_K"
    return "Q4_K"

