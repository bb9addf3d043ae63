"""GGUF, the llama.cpp file format: read it into our model, write it for llama.cpp.

Modules, each with one job:
  container   the file itself: header, key/value metadata, tensor directory, mapped tensor bytes
  layout      HF <-> llama.cpp tensor names, rotary row order, stacked experts
  metadata    GGUF keys <-> our config (muP scalings, rope scaling, `hf.config`) and tokenizer
  dequantize  stored tensor data -> torch (fast Q8_0/Q4_0/Q4_1 decoders, gguf-py for the rest)
  quantize    torch -> stored tensor data (our Q4_K/Q5_K/Q6_K encoders, gguf-py for the rest)
  file_types  which GGML type each tensor gets for a file type (llama.cpp's Q4_K_M policy)
  read        `read_gguf`, `read_gguf_info`, `load_gguf`
  write       `write_gguf`
"""

from minicpm.formats.gguf.container import GGUFFile, GGUFTensorInfo
from minicpm.formats.gguf.file_types import FILE_TYPES
from minicpm.formats.gguf.layout import (
    EXPERT_NAMES,
    TENSOR_NAMES,
    deinterleave_rope_rows,
    gguf_to_hf_name,
    hf_to_gguf_name,
    interleave_rope_rows,
)
from minicpm.formats.gguf.metadata import (
    HF_CONFIG_KEY,
    SUPPORTED_ARCHITECTURES,
    config_from_metadata,
)
from minicpm.formats.gguf.quantize import encode_k_quant
from minicpm.formats.gguf.read import load_gguf, open_gguf, read_gguf, read_gguf_info
from minicpm.formats.gguf.write import write_gguf

__all__ = ["read_gguf", "read_gguf_info", "load_gguf", "open_gguf", "write_gguf",
           "SUPPORTED_ARCHITECTURES", "FILE_TYPES", "HF_CONFIG_KEY", "TENSOR_NAMES",
           "EXPERT_NAMES", "config_from_metadata", "gguf_to_hf_name", "hf_to_gguf_name",
           "interleave_rope_rows", "deinterleave_rope_rows", "encode_k_quant", "GGUFFile",
           "GGUFTensorInfo"]
