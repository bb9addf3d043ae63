"""The perceiver resampler of MiniCPM-V 2.0 (`resampler.*`): a slice's patch features -> a fixed
number of tokens (query_num) in the language model's width, by one cross-attention.

It has two position tables, used differently (both as in the official code):
- the queries get the stored `pos_embed` (the sin-cos table of the 8x8 query grid, a parameter
  in the checkpoint), added after `ln_q`;
- the keys get a sin-cos table computed for the slice's own patch grid (gh x gw) at every call;
  the values get none.
The output is `ln_post(attn) @ proj` (right-multiplied by the stored matrix).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpm.kernels.linear import linear_gemm, linear_widened, widens
from minicpm.vision.siglip import dense

LN_EPS = 1e-6


@functools.lru_cache(maxsize=64)
def sincos_table(dim: int, gh: int, gw: int) -> torch.Tensor:
    """The MAE 2D sin-cos table [gh*gw, dim] in float32, rows row-major over (gh, gw): each
    position is [sin, cos](col * w), [sin, cos](row * w) with w = 1 / 10000^(i / (dim/4)).
    Computed with numpy in float32, step by step as the official code does, so it is the same
    table to the last bit (the official grid puts the column index first)."""
    omega = np.arange(dim // 4, dtype=np.float32)
    omega /= dim / 4.0
    omega = 1.0 / 10000 ** omega
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij")
    halves = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = np.einsum("m,d->md", pos, omega)
        halves += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(halves, axis=1))


class CrossAttention(nn.Module):
    """nn.MultiheadAttention's parameters and math (q, k, v from one stacked in_proj), written
    out batch-first so that slices of one size run as one batch."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # rows [Wq; Wk; Wv]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [B, Q, D], key/value [B, L, D] -> [B, Q, D]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = (self._heads(linear_gemm(x, w, b)) for x, w, b in
                   ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return dense(self.out_proj, out.transpose(1, 2).reshape(b, n, -1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(num_queries, embed_dim))  # stored, not trained
        # Only when the widths differ, as in the official code (nn.Identity has no key).
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = CrossAttention(embed_dim, embed_dim // 128)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.ln_post = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, tgt_size: tuple[int, int]) -> torch.Tensor:
        """Patch features x [B, gh*gw, kv_dim] of B slices of one grid size (gh, gw) ->
        [B, num_queries, embed_dim]."""
        key_pos = sincos_table(self.embed_dim, *tgt_size).to(device=x.device, dtype=x.dtype)
        kv = self.ln_kv(dense(self.kv_proj, x))
        q = self.ln_q(self.query) + self.pos_embed
        out = self.attn(q.expand(x.shape[0], -1, -1), kv + key_pos, kv)
        out = self.ln_post(out)
        return linear_widened(out, self.proj.t()) if widens(out, self.proj, None) else out @ self.proj
