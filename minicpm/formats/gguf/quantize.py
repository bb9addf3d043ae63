"""Tensors -> the bytes GGUF stores for a GGML type (`encode_tensor`), with our own encoders for
llama.cpp's k-quant block formats (Q4_K, Q5_K, Q6_K), which gguf-py cannot write; the other
block types come from gguf-py.

The k-quant encoders follow llama.cpp's reference quantizers without an importance matrix
(`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, what `llama-quantize` runs when given none),
vectorised over all blocks of a tensor with torch:

* Q4_K / Q5_K: super-blocks of 256 values = 8 sub-blocks of 32, each `d * sc * q - dmin * m`
  with q in 0..15 (0..31), sc and m 6-bit, d and dmin float16. Each sub-block's scale and min
  come from llama.cpp's weighted search (`make_qkx2_quants`: weights sqrt(mean x^2) + |x|; start
  from the min/max grid, then try nstep+1 stretched grids, fit scale and min by weighted least
  squares on each, keep the lowest weighted squared error). The sub-block scales and mins are
  then quantized to 6 bits against their largest, and the values re-rounded with those.
* Q6_K: 16 sub-blocks of 16, each `d * sc * (q - 32)` with q in 0..63 and sc int8. Sub-block
  scales come from `make_qx_quants` (weights x^2; the grid through the largest magnitude, then 18
  stretched ones, keeping the best least-squares fit), then are quantized to 8 bits.

Rounding is nearest-even as llama.cpp's `nearest_int` (a float32 magic-number add); arithmetic is
float32. Sums run in a different order than llama.cpp's loops, so a near-tie between two
candidate grids can go the other way: most blocks come out byte-identical, the rest differ in a
way that changes the error by a hair (tests/test_gguf_kquants.py measures both).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

__all__ = ["QK_K", "BLOCK_BYTES", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k",
           "encode_k_quant", "K_QUANT_ENCODERS", "encode_tensor"]

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = 1e-15  # llama.cpp: below this a (sub-)block counts as all zero
# Super-blocks encoded together: big enough to amortise torch's per-op cost, small enough that
# the ~20 temporaries of a chunk stay in a few MB of cache-friendly memory.
CHUNK_BLOCKS = 1024


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # half to even, like adding 1.5 * 2**23 in float32


def _f32(value: float) -> float:
    return float(np.float32(value))


def _fp16_round_trip(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# Scale searches (one row of `x` per sub-block)
# ------------------------------------------------------------------------------------------------
def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float,
                      rdelta: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, min, L) per row such that x ~ scale * L - min, L in 0..nmax, min >= 0."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    flat = hi == lo  # all zero (lo <= 0 <= hi): L = 0, scale 0
    hi = torch.where(flat, torch.ones_like(hi), hi)

    iscale = nmax / (hi - lo)
    scale = 1.0 / iscale
    levels = _round(iscale * (x - lo)).clamp_(0, nmax)
    best = (weights * (scale * levels + lo - x).square()).sum(-1, keepdim=True)
    for step in range(nstep + 1):
        # the stretch factor exactly as llama.cpp's float32 expression rmin + rdelta*is + nmax
        stretch = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * step)) + nmax)
        # llama.cpp's loop grids from the best min found so far, not the data's minimum
        # in place where possible: these few passes over the data are the encoder's whole cost
        trial = (x - lo).mul_(stretch / (hi - lo)).round_().clamp_(0, nmax)
        wl = weights * trial
        sum_l = wl.sum(-1, keepdim=True)
        sum_l2 = (wl * trial).sum(-1, keepdim=True)
        sum_xl = wl.mul_(x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the fit wants a positive offset: refit through zero instead
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        residual = (trial * this_scale).add_(this_min).sub_(x)
        error = residual.square_().mul_(weights).sum(-1, keepdim=True)
        better = (det > 0) & (error < best)  # NaN errors (degenerate fits) never win
        levels = torch.where(better, trial, levels)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.squeeze(-1), -lo.squeeze(-1), levels


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each row, sign kept (the first one on ties)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, L) per row such that x ~ scale * (L - nmax), L in 0..2*nmax-1 (rmse_type 1:
    squared error weighted by x^2)."""
    peak = _signed_absmax(x)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    weights = x.square()
    wx = weights * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = (x * iscale).round_().clamp_(-nmax, nmax - 1)
        return q, (wx * q).sum(-1, keepdim=True), (weights * q).mul_(q).sum(-1, keepdim=True)

    levels, sum_lx, sum_l2 = fit(-nmax / peak)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial, sum_lx, sum_l2 = fit(-_f32(nmax + _f32(_f32(0.1) * step)) / peak)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        levels = torch.where(better, trial, levels)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    return scale.squeeze(-1), levels + nmax


# ------------------------------------------------------------------------------------------------
# Block encoders: [n_blocks, 256] float32 -> [n_blocks, BLOCK_BYTES] uint8
# ------------------------------------------------------------------------------------------------
def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> the little-endian float16 bytes [n, 2]."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _scale_min_k4(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared part of Q4_K and Q5_K: (levels [n, 256] uint8, d, dmin [n] float32,
    packed 6-bit scales and mins [n, 12] uint8)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    weights = sub.square().mean(-1, keepdim=True).sqrt() + sub.abs()
    scales, mins, levels = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    max_scale = scales.amax(-1, keepdim=True).clamp(min=0.0)
    max_min = mins.amax(-1, keepdim=True).clamp(min=0.0)
    inv_scale = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    ls = _round(inv_scale * scales).clamp_(0, 63)
    lm = _round(inv_min * mins).clamp_(0, 63)
    d = _fp16_round_trip(max_scale / 63.0)
    dmin = _fp16_round_trip(max_min / 63.0)

    # Re-round every value against the 6-bit scales as stored; a sub-block whose stored scale
    # is zero keeps the levels of its search (llama.cpp skips it the same way).
    sub_d = (d * ls).unsqueeze(-1)
    sub_m = (dmin * lm).unsqueeze(-1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    requant = _round((sub + sub_m) / safe_d).clamp_(0, nmax)
    levels = torch.where(sub_d == 0, levels, requant).reshape(n, QK_K).to(torch.uint8)

    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    # 12 bytes: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    # sub-blocks 4-7 as nibbles in bytes 8-11 with their top 2 bits in bytes 0-7's top bits.
    packed = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)
    return levels, d.squeeze(-1), dmin.squeeze(-1), packed


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    levels, d, dmin, packed = _scale_min_k4(x, 15, -1.0, 20)
    # 128 bytes: per 64 values, byte l holds value l (low nibble) and value l + 32 (high).
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_half_bytes(d), _half_bytes(dmin), packed, qs], dim=1)


def _q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    levels, d, dmin, packed = _scale_min_k4(x, 31, -0.5, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    low = pairs & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    # 32 bytes of fifth bits: byte j, bit 2k + t = fifth bit of value 64k + 32t + j
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 4, 2, 1)
    qh = ((pairs >> 4) << shifts).sum(dim=(1, 2), dtype=torch.uint8)
    return torch.cat([_half_bytes(d), _half_bytes(dmin), packed, qh, qs], dim=1)


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scales, levels = _make_qx_quants(sub, 32)
    peak = _signed_absmax(scales)
    empty = peak.abs() < GROUP_MAX_EPS  # written as 210 zero bytes
    peak = torch.where(empty, torch.ones_like(peak), peak)
    iscale = -128.0 / peak
    d = _fp16_round_trip(1.0 / iscale)
    sc = _round(iscale * scales).clamp_(max=127)
    sub_d = (d * sc).unsqueeze(-1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    requant = _round(sub / safe_d).clamp_(-32, 31) + 32
    levels = torch.where(sub_d == 0, levels, requant).reshape(n, QK_K).to(torch.uint8)

    # Per 128 values, four quarters q1..q4 of 32: ql byte l = q1 | q3 << 4 and byte 32 + l =
    # q2 | q4 << 4 (low nibbles); qh byte l = the top 2 bits of q1, q2, q3, q4 at bits 0, 2, 4, 6.
    quarters = levels.reshape(n, 2, 4, 32)
    low = quarters & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)],
                   dim=2).reshape(n, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((quarters >> 4) << shifts).sum(dim=2, dtype=torch.uint8).reshape(n, 64)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _half_bytes(d.squeeze(-1))],
                    dim=1)
    return torch.where(empty, torch.zeros_like(out), out)


_BLOCK_ENCODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_K": _q4_k_blocks, "Q5_K": _q5_k_blocks, "Q6_K": _q6_k_blocks}


def encode_k_quant(tensor: torch.Tensor | np.ndarray, qtype: str,
                   on_blocks: Callable[[int], None] | None = None) -> np.ndarray:
    """A tensor whose rows are whole super-blocks -> its GGUF bytes, uint8 [..., row bytes].

    `on_blocks(n)` is called after every n super-blocks (progress reporting).
    """
    encode = _BLOCK_ENCODERS[qtype]
    x = torch.as_tensor(tensor).detach().to("cpu", torch.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK_K} values, got shape "
                         f"{tuple(x.shape)}")
    blocks = x.reshape(-1, QK_K)
    out = torch.empty(blocks.shape[0], BLOCK_BYTES[qtype], dtype=torch.uint8)

    def encode_chunk(start: int) -> int:
        stop = min(start + CHUNK_BLOCKS, blocks.shape[0])
        with torch.no_grad():
            out[start:stop] = encode(blocks[start:stop].contiguous())
        return stop - start

    # Chunks run on a thread pool with torch single-threaded inside each: the ~300 small ops
    # of a chunk split across OpenMP threads spend more time in barriers than computing, and on
    # a busy machine a barrier waits for a descheduled thread (measured: 40x slower).
    threads = torch.get_num_threads()
    workers = max(1, min(threads, os.cpu_count() or 1))
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for done in pool.map(encode_chunk, range(0, blocks.shape[0], CHUNK_BLOCKS)):
                if on_blocks is not None:
                    on_blocks(done)
    finally:
        torch.set_num_threads(threads)
    row_bytes = x.shape[-1] // QK_K * BLOCK_BYTES[qtype]
    return out.numpy().reshape(*x.shape[:-1], row_bytes)


def quantize_q4_k(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    return encode_k_quant(tensor, "Q4_K")


def quantize_q5_k(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    return encode_k_quant(tensor, "Q5_K")


def quantize_q6_k(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    return encode_k_quant(tensor, "Q6_K")


K_QUANT_ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def encode_tensor(tensor: torch.Tensor, qtype, on_weights: Callable[[int], Any] | None = None
                  ) -> np.ndarray:
    """A tensor as the bytes/array GGUF stores for `qtype`. `on_weights(n)`: progress within a
    k-quant tensor (the slow ones: MiniCPM-2B's embedding alone takes tens of seconds)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    tensor = tensor.detach().cpu().contiguous()
    if qtype.name in K_QUANT_ENCODERS:  # gguf-py cannot write k-quants
        report = None if on_weights is None else (lambda blocks: on_weights(blocks * QK_K))
        return encode_k_quant(tensor, qtype.name, on_blocks=report)
    if qtype == T.F32:
        return tensor.float().numpy()
    if qtype == T.F16:
        return tensor.to(torch.float16).numpy()
    if qtype == T.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(tensor.float().numpy(), qtype)
