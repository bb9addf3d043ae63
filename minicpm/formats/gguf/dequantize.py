"""Stored GGUF tensor data -> torch tensors: F32/F16/BF16 as stored, block types dequantized to
float32 (Q8_0/Q4_0/Q4_1 by our own whole-tensor decoders, the rest by gguf-py); `to_float32`
gives numpy float32 without PyTorch (the torch-free runtime's embedding rows)."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["FAST_DEQUANTIZERS", "can_dequantize", "to_float32", "to_torch"]


@functools.cache
def can_dequantize(qtype: int) -> bool:
    """Does gguf-py decode this tensor type? (tried once on one zero block)"""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    kind = T(qtype)
    if kind in (T.F32, T.F16, T.BF16):
        return True
    if kind in (T.I8, T.I16, T.I32, T.I64, T.F64):
        return False  # not model weights
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


# gguf-py decodes in groups of 16 rows; whole-tensor numpy operations are about 3x faster (SmolLM2's
# Q4_1/Q8_0 weights: 0.7 s -> 0.23 s). Same float32 operations in the same order as gguf-py, so the
# results are bit-identical (tests compare them bit for bit). Block layouts, 32 values each:
#   Q8_0: f16 d, 32 x int8 q          -> d * q
#   Q4_0: f16 d, 16 bytes of nibbles  -> d * (q - 8)
#   Q4_1: f16 d, f16 m, 16 bytes      -> d * q + m
# A nibble byte j holds value j in its low and value j + 16 in its high half.
def _blocks(data: np.ndarray, type_size: int) -> np.ndarray:
    return data.reshape(-1, type_size)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes start..start+2 of every block, as a float32 column."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] values 0..15 (low halves first, then high halves)."""
    out = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[:, :packed.shape[1]])
    np.right_shift(packed, 4, out=out[:, packed.shape[1]:])
    return out


def _unblock(values: np.ndarray, data: np.ndarray, type_size: int) -> np.ndarray:
    """[n_blocks, 32] values -> the tensor's element shape (rows of whole blocks)."""
    return values.reshape(*data.shape[:-1], data.shape[-1] // type_size * values.shape[1])


def _dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 34)
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _half(blocks, 0)
    return _unblock(values, data, 34)


def _dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 18)
    values = (_nibbles(blocks[:, 2:]).view(np.int8) - np.int8(8)).astype(np.float32)
    values *= _half(blocks, 0)
    return _unblock(values, data, 18)


def _dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 20)
    values = _nibbles(blocks[:, 4:]).astype(np.float32)
    values *= _half(blocks, 0)
    values += _half(blocks, 2)  # a separate add, as gguf-py: no fused multiply-add rounding
    return _unblock(values, data, 20)


FAST_DEQUANTIZERS = {"Q8_0": _dequantize_q8_0, "Q4_0": _dequantize_q4_0,
                     "Q4_1": _dequantize_q4_1}


def to_float32(data: np.ndarray, qtype) -> np.ndarray:
    """Raw data of one tensor (or of some of its rows) -> a float32 numpy array of its own."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if qtype in (T.F32, T.F16):
        return np.asarray(data, dtype=np.float32)
    if qtype == T.BF16:  # the high half of a float32
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    fast = FAST_DEQUANTIZERS.get(qtype.name)
    return fast(data) if fast else dequantize(data, qtype)


def to_torch(data: np.ndarray, qtype):
    """One tensor's raw data (memory-mapped) -> torch, dequantized if it is a block type."""
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if qtype in (T.F32, T.F16):
        # A private copy in native byte order (the map is read-only; the file may be big-endian).
        return torch.from_numpy(np.array(data, dtype=data.dtype.newbyteorder("=")))
    if qtype == T.BF16:  # stored as raw bytes; reinterpret rather than widen
        raw = np.array(data).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16)
    fast = FAST_DEQUANTIZERS.get(qtype.name)
    return torch.from_numpy(fast(data) if fast else dequantize(data, qtype))

