"""Test helpers for GGUF files that our writer would not produce (foreign architectures, odd
tensor types, big-endian files), shared by test_gguf.py and test_gguf_kquants.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFEndian


def write_raw(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, T | None]],
              endianess: GGUFEndian = GGUFEndian.LITTLE, extra=None) -> Path:
    """A GGUF file with a minimal llama-style header; `extra(writer)` adds more keys."""
    writer = gguf.GGUFWriter(path, arch, endianess=endianess)
    if extra is not None:
        extra(writer)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(160)
    writer.add_head_count(4)
    writer.add_vocab_size(320)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
