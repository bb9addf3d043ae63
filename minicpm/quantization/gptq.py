"""GPTQ (Frantar et al. 2022) for one Linear, as the reference implementation does it
(IST-DASLab/gptq `gptq.py`, AutoGPTQ `quantization/gptq.py`):

    H = 2/n * sum over calibration sequences of X X^T          (Hessian of ||XW^T - XQ^T||^2)
    dead inputs (H_ii = 0): weight column zeroed, H_ii = 1
    H += percdamp * mean(diag H) * I
    U = cholesky(H^-1)^T   (upper)
    columns quantized left to right in blocks of 128; each column's error, scaled by 1/U_ii,
    is pushed onto the columns still to come (inside the block at once, the rest lazily per block)

with act-order (`desc_act`): columns visited in order of decreasing H_ii. Group parameters then
come either from the columns as they are visited (the groups are runs of the *permuted* order,
so a column's group is g_idx[k], not k // G) or, with `static_groups`, from the contiguous
original groups computed before any update (g_idx = k // G).

The quantizer grids: int4 asymmetric (AutoGPTQ's: min/max of the group widened to include 0,
integer zero point), int4 symmetric (zero 8), and for int8 our per-row symmetric grid
(q in -127..127, no zero point), the form QuantizedLinear's int8 layer holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm.loading.assemble import one_thread

BLOCK_SIZE = 128
PERCDAMP = 0.01
MSE_STEPS, MSE_NORM = 80, 2.4  # the reference's grid=100 x maxshrink=0.8 steps, norm=2.4


@dataclass
class GPTQResult:
    """Integer codes [N, K] (uint8 0..15 for int4, int8 for int8), per-group scales and zero
    points [N, groups] (int8: scales [N, 1], zeros None), the group of each input column
    (g_idx [K]) and the dequantized weight [N, K] the error feedback worked against."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor
    weight: torch.Tensor


class Hessian:
    """Running H = 2/n * X^T X over calibration sequences (n counts sequences, as the reference)."""

    def __init__(self, columns: int):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., S, K]: the Linear's input for one batch of sequences."""
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.matrix *= self.count / (self.count + batch)
        self.count += batch
        x = x * (2 / self.count) ** 0.5
        self.matrix.addmm_(x.t(), x)


class Grid:
    """One quantization grid: `fit` picks scale and zero per row of a slice of columns,
    `codes` maps values to codes and `values` codes back. With `mse`, `fit` searches the range as
    the reference quantizer's optional MSE grid does (IST-DASLab `Quantizer(mse=True)`: grid 100,
    maxshrink 0.8, norm 2.4): the min/max range shrunk in 1% steps down to 21% of itself, each row
    keeping the scale and zero whose rounding error, the sum of |err|^2.4, is least."""

    def __init__(self, bits: int, sym: bool, mse: bool = False):
        self.bits, self.sym, self.mse = bits, sym, mse
        self.maxq = 2**bits - 1

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale [N], zero [N] or None) for the columns w [N, G]."""
        xmin, xmax = self._range(w)
        scale, zero = self._scale_zero(xmin, xmax)
        if not self.mse:
            return scale, zero
        best = self._error(w, scale, zero)
        for i in range(1, MSE_STEPS):
            shrunk = self._scale_zero(xmin * (1 - i / 100), xmax * (1 - i / 100))
            err = self._error(w, *shrunk)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, shrunk[0], scale)
            zero = None if zero is None else torch.where(better, shrunk[1], zero)
        return scale, zero

    def _range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits == 8:  # our int8 form: symmetric, w = q * scale, q in -127..127
            amax = w.abs().amax(dim=1)
            return -amax, amax
        zero_t = torch.zeros(w.shape[0], dtype=w.dtype)
        xmin, xmax = torch.minimum(w.amin(dim=1), zero_t), torch.maximum(w.amax(dim=1), zero_t)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        return torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)

    def _scale_zero(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.bits == 8:
            return (xmax / 127).clamp(min=1e-10), None
        scale = (xmax - xmin) / self.maxq
        zero = torch.full_like(scale, (self.maxq + 1) / 2) if self.sym else torch.round(-xmin / scale)
        return scale, zero

    def _error(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return (Grid.values(self.codes(w, scale, zero), scale, zero) - w).abs_().pow_(MSE_NORM).sum(dim=1)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Codes of w [N, C] with per-row scale/zero [N] (as floats)."""
        if zero is None:
            return torch.clamp(torch.round(w / scale[:, None]), -127, 127)
        return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, self.maxq)

    @staticmethod
    def values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return q * scale[:, None] if zero is None else (q - zero[:, None]) * scale[:, None]


def prepared_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with dead inputs set to 1, W with their columns zeroed): a column that never sees a
    nonzero input cannot affect the output, and H stays invertible."""
    h, w = hessian.clone(), weight.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return h, w


def inverse_cholesky(h: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H)."""
    h = h.clone()
    idx = torch.arange(h.shape[0])
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  sym: bool = False, act_order: bool = False, static_groups: bool = False,
                  mse: bool = False, percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE) -> GPTQResult:
    """Quantize weight [N, K] against the Hessian [K, K] of its input. int8 is per row
    (group_size None); int4 takes group_size G dividing K. `mse`: search each group's range
    (Grid)."""
    with one_thread():  # small ops: see one_thread
        return _gptq(weight, hessian, bits, group_size, sym, act_order, static_groups, mse, percdamp, block_size)


def _gptq(weight, hessian, bits, group_size, sym, act_order, static_groups, mse, percdamp, block_size
          ) -> GPTQResult:
    grid = Grid(bits, sym, mse)
    n, k = weight.shape
    group = k if group_size is None else group_size
    h, w = prepared_hessian(hessian.float(), weight.float())
    statics = [grid.fit(w[:, i:i + group]) for i in range(0, k, group)] if static_groups else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_cholesky(h, percdamp)

    q_codes = torch.zeros_like(w)
    q_values = torch.zeros_like(w)
    visited_params: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if statics is not None:
                scale, zero = statics[int(perm[col]) // group]
            elif col % group == 0:
                # As the reference: the group's parameters from W as lazily updated so far
                # (the block's own in-place updates live in w1).
                scale, zero = grid.fit(w[:, col:col + group])
                visited_params.append((scale, zero))
            column = w1[:, i:i + 1]
            codes = grid.codes(column, scale, zero)
            values = Grid.values(codes, scale, zero)
            q_codes[:, col], q_values[:, col] = codes[:, 0], values[:, 0]
            err = (column[:, 0] - values[:, 0]) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, values = q_codes[:, inv], q_values[:, inv]
    if statics is not None:
        params, g_idx = statics, torch.arange(k) // group
    else:
        params, g_idx = visited_params, (torch.arange(k) // group)[inv]
    scales = torch.stack([s for s, _ in params], dim=1)
    zeros = None if params[0][1] is None else torch.stack([z for _, z in params], dim=1)
    dtype = torch.int8 if bits == 8 else torch.uint8
    return GPTQResult(codes.to(dtype), scales, zeros, g_idx.to(torch.int32), values)


def dequantize_with_g_idx(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                          g_idx: torch.Tensor) -> torch.Tensor:
    """w[n, k] = (q[n, k] - zeros[n, g_idx[k]]) * scales[n, g_idx[k]]: the GPTQ checkpoint rule."""
    g = g_idx.long()
    q = codes.float()
    return q * scales[:, g] if zeros is None else (q - zeros[:, g]) * scales[:, g]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative reconstruction error of a Linear on its calibration inputs,
    ||X (W - Q)^T||^2 / ||X W^T||^2 = tr(D H D^T) / tr(W H W^T) with D = W - Q."""
    d = (weight.float() - quantized.float())
    w = weight.float()
    num = torch.einsum("nk,kj,nj->", d, hessian, d)
    den = torch.einsum("nk,kj,nj->", w, hessian, w).clamp(min=1e-30)
    return float(num / den)
