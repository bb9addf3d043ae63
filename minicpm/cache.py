"""KV caches: preallocated keys and values for every layer, in the model's dtype, int8 or int4.

One cache serves two ways of decoding: a batch advancing in lockstep (`generate`, chat) and
independent slots at their own lengths (the serving engine's continuous batching, through
`SlotStep`). Attention over the cache runs the native decode kernel where it serves and
PyTorch's attention otherwise (`minicpm.kernels.attention`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from minicpm.config import MiniCPMConfig
from minicpm.kernels.attention import attention, causal_attention, decode_attention


class KVCache:
    """Preallocated keys and values for every layer, [batch, kv_heads, max_len, head_dim].

    Two ways to use it. As one batch: all rows share one write position (`length`); left padding
    is handled by the attention mask, so a batch of different prompt lengths still advances in
    lockstep. As independent slots (the serving engine): each row holds its own sequence at its
    own length, which the caller tracks; `view(slot, length)` prefills one slot and
    `write_rows`/`attend_rows` decode one token for several slots at their own positions.
    """

    STORES = ("keys", "values")  # attribute names of the per-layer tensor lists

    def __init__(self, config: MiniCPMConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        self.shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.dtype = dtype  # of the keys/values handed to attention
        self.max_len = max_len
        self.length = 0
        self._allocate_stores(config.num_hidden_layers, device)

    def _allocate_stores(self, layers: int, device: Any) -> None:
        # empty, not zeros: slots past `length` are never read, and untouched pages of a long
        # context cost no memory until they are written
        self.keys = self._allocate(layers, self.shape, self.dtype, device)
        self.values = self._allocate(layers, self.shape, self.dtype, device)

    @staticmethod
    def _allocate(layers: int, shape: tuple, dtype: torch.dtype, device: Any) -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store this step's k/v at the current position; returns the new end position."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return end

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, end), [batch, kv_heads, end, head_dim]."""
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v at the current position; return all keys/values so far."""
        return self.read(layer, self.write(layer, k, v))

    def attend(self, layer: int, q: torch.Tensor, end: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Attention of a single query per row over positions [0, end), straight from the
        stores by the native kernel (fp32 result); None where it does not serve."""
        return decode_attention(q, self.keys[layer], self.values[layer], end, mask, *self._scales(layer))

    def attend_prefill(self, layer: int, q: torch.Tensor, end: int, mask) -> torch.Tensor | None:
        """Causal attention of several new queries (the last of positions [0, end)) straight
        from coded stores; None here: `read` gives the stores themselves, which the caller's
        attention reads as they are."""
        return None

    def _scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None  # keys and values are stored as they are

    # ---- independent slots (rows at their own lengths)

    def view(self, slot: int, length: int) -> KVCache:
        """Row `slot` as a batch-1 cache holding `length` positions; it shares this cache's
        memory, so running the model on it (a prefill chunk) fills the slot."""
        view = copy.copy(self)
        for name in self.STORES:
            setattr(view, name, [t[slot:slot + 1] for t in getattr(self, name)])
        view.shape = (1,) + self.shape[1:]
        view.length = length
        return view

    def write_rows(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
        """One new token per row: k/v [B, KV, 1, D] row i goes to slot rows[i] at positions[i]."""
        self.keys[layer][rows, :, positions] = k[:, :, 0]
        self.values[layer][rows, :, positions] = v[:, :, 0]

    def read_row(self, layer: int, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one slot's positions [start, end), [1, kv_heads, end - start, head_dim]."""
        return (self.keys[layer][slot:slot + 1, :, start:end],
                self.values[layer][slot:slot + 1, :, start:end])

    def attend_rows(self, layer: int, q: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor | None,
                    ends: torch.Tensor, bound: int) -> torch.Tensor:
        """Attention of q [B, H, 1, D], row i over positions [starts[i], ends[i]) of slot rows[i]
        (starts None: from 0; bound = max(ends)). A row's result never depends on the other rows:
        the kernel reduces each over its own positions only, and so does the PyTorch loop."""
        out = decode_attention(q, self.keys[layer], self.values[layer], bound, None, *self._scales(layer),
                               rows=rows, starts=starts, ends=ends)
        if out is not None:
            return out
        firsts = [0] * len(rows) if starts is None else starts.tolist()
        return torch.cat([attention(q[i:i + 1], *self.read_row(layer, row, first, end), None)
                          for i, (row, first, end) in enumerate(zip(rows.tolist(), firsts, ends.tolist()))])

    def copy_prefix(self, other: KVCache, keep: int) -> None:
        """Take the first `keep` positions of `other` (same layout; a conversation outgrew it)."""
        for mine, theirs in zip(self._stores(), other._stores()):
            mine[:, :, :keep] = theirs[:, :, :keep]

    def fork_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache (same kind and capacity) whose row i holds a copy of this cache's row
        rows[i] over its first `length` positions: one prefilled prompt forked into several
        continuations (log-likelihood scoring of the choices of a question)."""
        forked = copy.copy(self)
        for name in self.STORES:
            setattr(forked, name, [self._copy_rows(t, rows) for t in getattr(self, name)])
        forked.shape = (len(rows),) + self.shape[1:]
        return forked

    def _copy_rows(self, store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = store.new_empty((len(rows),) + tuple(store.shape[1:]))
        out[:, :, :self.length] = store[rows.to(store.device), :, :self.length]
        return out

    def reorder_rows(self, rows: torch.Tensor, start: int = 0) -> None:
        """Row i takes old row rows[i]'s positions [start, length) in place (beam search: each beam
        continues a chosen one; positions before `start` are the same in every row)."""
        if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            return
        for store in self._stores():
            part = store[:, :, start:self.length]
            part.copy_(part.index_select(0, rows.to(store.device)))

    def _stores(self) -> list[torch.Tensor]:
        return [t for name in self.STORES for t in getattr(self, name)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stores())

    def reset(self) -> None:
        self.length = 0


class Int8KVCache(KVCache):
    """Keys and values as int8 with one scale per (token, head): half of a bf16 cache.

    MiniCPM-2B has no GQA, so its bf16 cache takes 0.37 MB per token (750 MB at 2k tokens);
    the int8 one 0.2 MB. Symmetric absmax rounding per head vector, as llama.cpp's q8_0 cache
    does per 32 values. The native decode kernel reads the codes directly; PyTorch's attention
    (prefill, or no native kernel) gets dequantized copies of the layer it works on, so a
    prefill chunk attends to its own keys as they were stored, as later tokens will.
    """

    STORES = ("keys", "values", "key_scales", "value_scales")
    CODES = torch.int8  # what attention.c's kind and decode.c's cache writes key on
    META = 1  # fp32 numbers per (token, head): the scale

    def _allocate_stores(self, layers: int, device: Any) -> None:
        self.keys = self._allocate(layers, self.code_shape(), self.CODES, device)
        self.values = self._allocate(layers, self.code_shape(), self.CODES, device)
        meta = self.shape[:3] + (self.META,)  # fp32: what the native kernel reads, 6% of the codes
        self.key_scales = self._allocate(layers, meta, torch.float32, device)
        self.value_scales = self._allocate(layers, meta, torch.float32, device)

    def code_shape(self) -> tuple[int, ...]:
        return self.shape

    def _quantize(self, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and fp32 scales [..., 1] of head vectors [..., D]."""
        scale = (new.abs().amax(-1, keepdim=True).float() / 127).clamp(min=1e-8)
        return torch.round(new.float() / scale).to(torch.int8), scale

    def _decode(self, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        # in place: a prefill chunk dequantizes a whole layer, which should cost one fp32 copy
        return codes.float().mul_(meta)

    def _coded(self) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], ...]:
        return (self.keys, self.key_scales), (self.values, self.value_scales)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        start, end = self.length, self.length + k.shape[2]
        for (store, scales), new in zip(self._coded(), (k, v)):
            store[layer][:, :, start:end], scales[layer][:, :, start:end] = self._quantize(new)
        return end

    def write_rows(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
        for (store, scales), new in zip(self._coded(), (k, v)):
            store[layer][rows, :, positions], scales[layer][rows, :, positions] = self._quantize(new[:, :, 0])

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantized(layer, (slice(None), slice(None), slice(0, end)))

    def read_row(self, layer: int, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantized(layer, (slice(slot, slot + 1), slice(None), slice(start, end)))

    def _dequantized(self, layer: int, part: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self._decode(store[layer][part], scales[layer][part]).to(self.dtype)
                     for store, scales in self._coded())

    def _scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_scales[layer], self.value_scales[layer]

    def attend_prefill(self, layer: int, q: torch.Tensor, end: int, mask) -> torch.Tensor | None:
        """The native causal kernel on the codes and scales as stored (no dequantized copy of
        the layer: at long contexts that copy was the chunk's largest buffer); plain causal only."""
        if mask is not None:
            return None
        part = (slice(None), slice(None), slice(0, end))
        return causal_attention(q, self.keys[layer][part], self.values[layer][part],
                                self.key_scales[layer][part], self.value_scales[layer][part])


class Int4KVCache(Int8KVCache):
    """Keys and values as 4-bit codes with a scale and a minimum per (token, head): a quarter
    of a bf16 cache plus 8 bytes per head vector (MiniCPM-2B: 0.12 MB per token).

    Asymmetric rounding, value = code * scale + min with codes 0..15: a head vector's range
    rarely sits around zero, and the minimum buys back the bit a sign would cost. Each 16
    values of a head vector take 8 bytes, byte j holding value j (low nibble) and value j + 8
    (high nibble), so the native kernel widens 16 codes with two masks and one unpack.
    """

    CODES = torch.uint8
    META = 2  # scale, min

    def code_shape(self) -> tuple[int, ...]:
        return self.shape[:3] + (self.shape[3] // 2,)

    def _quantize(self, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed codes [..., D/2] and fp32 (scale, min) [..., 2] of head vectors [..., D]."""
        x = new.float()
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = torch.round((x - low) / scale).clamp(0, 15).to(torch.uint8)
        pairs = codes.unflatten(-1, (-1, 2, 8))  # [..., D/16, (low, high), 8]
        packed = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).flatten(-2)
        return packed, torch.cat([scale, low], -1)

    def _decode(self, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        chunks = codes.unflatten(-1, (-1, 8))
        values = torch.stack([chunks & 15, chunks >> 4], -2).flatten(-3).float()
        return values.mul_(meta[..., :1]).add_(meta[..., 1:])


class SlotStep:
    """What the layers see of the cache while decoding one token for several slots at once:
    row i writes at positions[i] of slot rows[i] and attends to that slot's positions up to it
    (the last `window` of them with a sliding window). Same protocol as KVCache (write, attend)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, positions: torch.Tensor, window: int | None):
        self.cache, self.rows, self.positions = cache, rows, positions
        self.ends = positions + 1
        self.starts = None if window is None else (self.ends - window).clamp(min=0)
        self.bound = int(self.ends.max())

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write_rows(layer, self.rows, self.positions, k, v)

    def attend(self, layer: int, q: torch.Tensor, end: None, mask: None) -> torch.Tensor:
        return self.cache.attend_rows(layer, q, self.rows, self.starts, self.ends, self.bound)


KV_CACHE_DTYPES = ("auto", "int8", "int4")
_QUANTIZED_CACHES = {"int8": Int8KVCache, "int4": Int4KVCache}


def make_cache(config: MiniCPMConfig, batch_size: int, max_len: int, kind: str = "auto",
               dtype: torch.dtype = torch.float32, device: Any = None) -> KVCache:
    """An empty cache; `kind` "auto" stores keys/values in `dtype`, "int8" in about half the
    memory of bf16, "int4" in about a quarter."""
    if kind not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kind!r}")
    if kind == "int4" and config.head_dim % 16:
        raise ValueError(f"an int4 KV cache needs a head_dim that is a multiple of 16, not {config.head_dim}")
    cls = _QUANTIZED_CACHES.get(kind, KVCache)
    return cls(config, batch_size, max_len, dtype=dtype, device=device)
