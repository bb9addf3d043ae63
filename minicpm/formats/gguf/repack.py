"""GGUF quantized blocks -> QuantizedLinear layers, exactly: the same dequantized values, no re-rounding.

Each block type is a form our int4/int8 kernel runs (minicpm/kernels/qgemm.c):
    Q4_0  f16 d, 32 nibbles          w = q*d - 8d      int4 + offsets, groups of 32 (fp16 if -8d fits)
    Q4_1  f16 d, f16 m, 32 nibbles   w = q*d + m       int4 + offsets, groups of 32, fp16
    Q4_K  256 values: f16 d, dmin, 8 x 6-bit (sc, mn), 4-bit q
                                     w = q*(d*sc) - dmin*mn   int4 + offsets, groups of 32, fp32
    Q8_0  f16 d, 32 x int8           w = q*d           int8, groups of 32, fp16
    Q5_0  f16 d, 32 high bits, 32 nibbles
                                     w = (q-16)*d      int8, groups of 32, fp16 (one byte a weight
                                                       against 5.5 bits stored: llama.cpp's Q4_K
                                                       fallback, MiniCPM-2B Q4_K_M's ffn_down)
    Q6_K  256 values: 6-bit q, 16 x int8 sc, f16 d
                                     w = (q-32)*(d*sc) int8, groups of 16, fp32
The products d*sc and dmin*mn have at most 19 significant bits, so fp32 holds them exactly, and
QuantizedLinear.dequantize() computes q*s (+ m) in fp32 with one rounding each, as gguf-py does.
Whole tensors are decoded with numpy bit operations (no per-block Python). Q4_0/Q4_1 nibbles are
already in the kernel's byte order (a byte holds k = j and 16 + j of its block): they are passed
as they are (`block_nibbles`), only 4-byte groups move. `repacked_parts` is numpy only (the
torch-free runtime, `minicpm.lean`, packs from it too); `repacked_linear` makes the layer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REPACKED_TYPES", "q4_k_superblocks", "q6_k_superblocks", "repacked_linear", "repacked_parts"]

REPACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K")


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> float32 [...] (exact)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _half(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> float16 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _smallest_exact(values: np.ndarray) -> np.ndarray:
    """fp16 when every value survives the round trip (half the metadata memory), else fp32."""
    half = values.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), values) else values


def _q4_0(blocks: np.ndarray):
    d = _f16(blocks[..., 0:2])
    return 4, 32, blocks[..., 2:18], d.astype(np.float16), _smallest_exact(-8 * d)


def _q4_1(blocks: np.ndarray):
    return 4, 32, blocks[..., 4:20], _half(blocks[..., 0:2]), _half(blocks[..., 2:4])


def _q8_0(blocks: np.ndarray):
    return 8, 32, np.ascontiguousarray(blocks[..., 2:34]).view(np.int8), _half(blocks[..., 0:2]), None


def _q5_0(blocks: np.ndarray):
    # value j (0..31): low 4 bits in byte j % 16 of qs (j < 16 low nibble, else high), bit 4 in bit j of qh
    qh = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")
    qs = blocks[..., 6:22]
    low = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)
    high = (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
    return 8, 32, (low | high).view(np.int8) - np.int8(16), _half(blocks[..., 0:2]), None


def _q4_k_fields(flat: np.ndarray):
    """Q4_K blocks [B, 144] -> codes uint8 [B, 256], d and dmin (the fp16 bytes) [B, 2] each, the
    6-bit scales and mins uint8 [B, 8] each."""
    from gguf.quants import Q4_K

    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(flat[:, 4:16]))        # [blocks, 8] each
    qs = flat[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(-1, 256)                                     # sub-block 2c+h: chunk c, half h
    return codes, flat[:, 0:2], flat[:, 2:4], sc.astype(np.uint8), mn.astype(np.uint8)


def _q4_k(blocks: np.ndarray):
    lead = blocks.shape[:-1]
    codes, d, dmin, sc, mn = _q4_k_fields(blocks.reshape(-1, 144))
    scales, offsets = _f16(d)[:, None] * sc.astype(np.float32), -(_f16(dmin)[:, None] * mn.astype(np.float32))
    return 4, 32, codes.reshape(*lead, 256), scales.reshape(*lead, 8), offsets.reshape(*lead, 8)


def q4_k_superblocks(data: np.ndarray):
    """A Q4_K tensor's raw rows [N, row_bytes] -> (codes uint8 [N, K], metadata uint8 [N, K/256 * 20]:
    per super-block its d and dmin (fp16 bytes), 8 scales, 8 mins), what qgemm's form 3 reads
    (`qgemm_layout.pack_superblock_meta`): 2.5 bytes of metadata per 32 weights, as stored."""
    n = data.shape[0]
    codes, d, dmin, sc, mn = _q4_k_fields(np.asarray(data).reshape(-1, 144))
    meta = np.concatenate((d, dmin, sc, mn), axis=1)                          # [blocks, 20]
    return codes.reshape(n, -1), meta.reshape(n, -1)


def _q6_k_codes(flat: np.ndarray) -> np.ndarray:
    """Q6_K blocks [B, 210] -> codes uint8 [B, 256], 0..63 (the value is d * sc * (code - 32));
    the scales are bytes 192:208 (int8), d bytes 208:210 (fp16)."""
    ql = flat[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = flat[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((ql & 0x0F).reshape(-1, 8, 32) | ((qh & 0x03).reshape(-1, 8, 32) << 4)).reshape(-1, 256)


def _q6_k(blocks: np.ndarray):
    lead = blocks.shape[:-1]
    flat = blocks.reshape(-1, 210)
    q = _q6_k_codes(flat).view(np.int8) - np.int8(32)
    scales = _f16(flat[:, 208:210])[:, None] * np.ascontiguousarray(flat[:, 192:208]).view(np.int8).astype(np.float32)
    return 8, 16, q.reshape(*lead, 256), scales.reshape(*lead, 16), None


def q6_k_superblocks(data: np.ndarray):
    """A Q6_K tensor's raw rows [N, row_bytes] -> (codes uint8 [N, K] 0..63, metadata uint8
    [N, K/256 * 18]: per super-block d (fp16 bytes), then its 16 int8 scales), what qgemm's
    6-bit form reads (`qgemm_layout.pack_superblock_meta(..., bits=6)`): as stored."""
    n = data.shape[0]
    flat = np.asarray(data).reshape(-1, 210)
    meta = np.concatenate((flat[:, 208:210], flat[:, 192:208]), axis=1)          # [blocks, 18]
    return _q6_k_codes(flat).reshape(n, -1), meta.reshape(n, -1)


_DECODERS = {"Q4_0": (_q4_0, 18), "Q4_1": (_q4_1, 20), "Q8_0": (_q8_0, 34), "Q5_0": (_q5_0, 22), "Q4_K": (_q4_k, 144),
             "Q6_K": (_q6_k, 210)}


def repacked_parts(data: np.ndarray, type_name: str):
    """A 2-D tensor's raw rows [N, row_bytes] -> (bits, group, codes, scales [N, K/G], offsets
    [N, K/G] or None) as numpy arrays; codes int8 [N, K] (int8), uint8 [N, K] 0..15 (Q4_K) or
    uint8 [N, K/2] block nibbles (Q4_0/Q4_1, see QuantizedLinear's block_nibbles)."""
    decode, type_size = _DECODERS[type_name]
    n = data.shape[0]
    blocks = np.asarray(data).reshape(n, -1, type_size)
    bits, group, codes, scales, offsets = decode(blocks)
    codes = np.ascontiguousarray(codes).reshape(n, -1)
    return bits, group, codes, scales.reshape(n, -1), None if offsets is None else offsets.reshape(n, -1)


def repacked_linear(data: np.ndarray, type_name: str, rows=None):
    """A QuantizedLinear holding a GGUF tensor's blocks as stored (dtype float32: activations
    and dequantize() in fp32). `rows`: a row permutation applied to codes and metadata alike
    (the rotary de-interleave of q/k)."""
    import torch

    from minicpm.quantization.linear import QuantizedLinear

    parts = repacked_parts(data, type_name)
    bits, group = parts[:2]
    codes, scales, offsets = (None if a is None else torch.from_numpy(a) for a in parts[2:])
    if rows is not None:
        codes, scales = rows(codes), rows(scales)
        offsets = None if offsets is None else rows(offsets)
    nibbles = type_name in ("Q4_0", "Q4_1")
    n, k = codes.shape[0], scales.shape[1] * group
    return QuantizedLinear(k, n, bits, group, codes, scales, bias=None, offsets=offsets, dtype=torch.float32,
                           block_nibbles=nibbles)
