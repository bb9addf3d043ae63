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

Names are imported on first use: container, layout and metadata need no PyTorch, so the
torch-free runtime (`minicpm.lean`) reads GGUF files through them without loading it.
"""

import importlib

_WHERE = {
    "GGUFFile": "container", "GGUFTensorInfo": "container", "FILE_TYPES": "file_types",
    "EXPERT_NAMES": "layout", "TENSOR_NAMES": "layout", "deinterleave_rope_rows": "layout",
    "gguf_to_hf_name": "layout", "hf_to_gguf_name": "layout", "interleave_rope_rows": "layout",
    "HF_CONFIG_KEY": "metadata", "SUPPORTED_ARCHITECTURES": "metadata", "config_from_metadata": "metadata",
    "encode_k_quant": "quantize", "load_gguf": "read", "open_gguf": "read", "read_gguf": "read",
    "read_gguf_info": "read", "write_gguf": "write",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
