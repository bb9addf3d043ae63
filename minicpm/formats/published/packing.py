"""Integer codes packed into int32 words, as GPTQ and AWQ store them.

A word holds 32/bits codes, the lowest bits holding the lowest index (little-endian), and is
stored as the int32 with that bit pattern (a code 15 in the top nibble makes it negative).
GPTQ packs qweight along the input dimension (rows of [in, out]) and qzeros along the output
dimension (columns); AutoAWQ packs both along the output dimension and, within each word of 8,
interleaves the columns: nibble i holds column AWQ_ORDER[i].
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i of an AWQ word holds column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 [R, C] -> int32 codes, [R*32/bits, C] (dim 0) or [R, C*32/bits] (dim 1)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    w = words.to(torch.int32)
    if dim == 0:
        # an arithmetic shift fills with the sign bit; the mask keeps only the code's bits
        return ((w.unsqueeze(1) >> shifts.view(1, per, 1)) & mask).reshape(-1, w.shape[1])
    return ((w.unsqueeze(2) >> shifts.view(1, 1, per)) & mask).reshape(w.shape[0], -1)


def pack_words(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_words: codes 0..2^bits-1 [R, C] -> int32 words."""
    per = 32 // bits
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.reshape(-1, per, c.shape[1])
        shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, per, 1)
        words = (c << shifts).sum(dim=1)
    else:
        c = c.reshape(c.shape[0], -1, per)
        shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, 1, per)
        words = (c << shifts).sum(dim=2)
    # uint32 bit pattern -> int32 of the same bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM int32 [R, C/8] -> 4-bit codes [R, C] in natural column order."""
    codes = unpack_words(words, 4, dim=1)
    order = torch.arange(codes.shape[1]).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    return codes[:, order]


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of awq_unpack (natural column order -> AWQ's interleaved words)."""
    order = torch.arange(codes.shape[1]).view(-1, 8)[:, list(AWQ_ORDER)].reshape(-1)
    return pack_words(codes[:, order], 4, dim=1)
