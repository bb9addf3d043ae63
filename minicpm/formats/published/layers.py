"""Integer codes with per-group scales and integer zero points -> a layer our kernels run.

GPTQ and AWQ both dequantize as w[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)], which is
QuantizedLinear's int4 zero-point form when the groups g(k) are contiguous runs of G columns.
GPTQ act-order scatters them (g_idx); sorting the columns by group makes them contiguous, and
the layer gathers x's columns in that order (`input_perm`). 8-bit codes whose zero points are
all 128 (GPTQ sym) are int8 codes q - 128. Scales keep their stored dtype and zero points are
small integers, so the layer dequantizes to exactly the stored values.

Groups of unequal size (a shorter last group) are split into groups of their common divisor,
each keeping its group's scale and zero point. What has no kernel form (8-bit asym, groups not a
multiple of 32 columns) becomes a float weight, dequantized exactly, and the caller says so.
"""

from __future__ import annotations

import math

import torch

from minicpm.quantization.linear import QuantizedLinear


def repacked_layer(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups_of_k: torch.Tensor,
                   bits: int, bias: torch.Tensor | None, dtype: torch.dtype
                   ) -> tuple[QuantizedLinear | torch.Tensor, str | None]:
    """codes [N, K] and zeros [N, groups] (integers), scales [N, groups], the group of every
    column [K] -> (QuantizedLinear, None), or (float weight [N, K] in `dtype`, why not)."""
    n, k = codes.shape
    g = groups_of_k.long()
    contiguous = bool((g[1:] >= g[:-1]).all())
    perm = None if contiguous else torch.argsort(g, stable=True)
    sizes = torch.bincount(g, minlength=scales.shape[1])
    # A run of c*G columns is c groups of G with the same scale and zero point: a shorter last
    # group (in = 576, G = 128: four of 128 and one of 64) becomes groups of 64, exactly.
    group = math.gcd(*sizes.tolist())
    if perm is not None:
        codes = codes[:, perm]
    repeats = sizes // group
    split_scales, split_zeros = scales.repeat_interleave(repeats, dim=1), zeros.repeat_interleave(repeats, dim=1)
    if bits == 4:
        if group % 32 or k % 32:  # the kernel's blocks of x are 32 values
            return dequantized(codes_back(codes, perm), zeros, scales, g, dtype), f"groups of {group} columns"
        return QuantizedLinear(k, n, 4, group, codes.to(torch.uint8), split_scales, split_zeros.to(scales.dtype),
                               bias, dtype=dtype, input_perm=perm), None
    if not bool((split_zeros == 128).all()):
        return dequantized(codes_back(codes, perm), zeros, scales, g, dtype), "8-bit zero points other than 128"
    per_row = split_scales.shape[1] == 1
    if not per_row and group != 16 and group % 32:
        return dequantized(codes_back(codes, perm), zeros, scales, g, dtype), f"8-bit groups of {group} columns"
    q8 = (codes.to(torch.int16) - 128).to(torch.int8)
    return QuantizedLinear(k, n, 8, None if per_row else group, q8, split_scales[:, 0] if per_row else split_scales,
                           None, bias, dtype=dtype, input_perm=perm), None


def codes_back(codes: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Columns sorted by `perm` back in their original order."""
    if perm is None:
        return codes
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def dequantized(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups_of_k: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """(q - z[g]) * s[g] in float32 (exact: small integers times a 16-bit float), then `dtype`."""
    g = groups_of_k.long()
    diff = codes.to(torch.int32) - zeros.to(torch.int32)[:, g]
    return (diff.float() * scales.float()[:, g]).to(dtype)
