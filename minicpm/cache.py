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
    ALIGN = 1  # writing may resume at any position (Int4KVCache: only at block boundaries)

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

    def span(self, name: str, start: int, end: int) -> slice:
        """The part of store `name` (along its position axis) that holds positions [start, end)."""
        return slice(start, end)

    def resumable(self, n: int) -> int:
        """The most of the first `n` positions that writing can continue after (rewinding the
        cache to them): all of them here."""
        return n

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
        for name in self.STORES:
            part = self.span(name, 0, keep)
            for mine, theirs in zip(getattr(self, name), getattr(other, name)):
                mine[:, :, part] = theirs[:, :, part]

    def fork_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache (same kind and capacity) whose row i holds a copy of this cache's row
        rows[i] over its first `length` positions: one prefilled prompt forked into several
        continuations (log-likelihood scoring of the choices of a question)."""
        forked = copy.copy(self)
        for name in self.STORES:
            part = self.span(name, 0, self.length)
            setattr(forked, name, [self._copy_rows(t, rows, part) for t in getattr(self, name)])
        forked.shape = (len(rows),) + self.shape[1:]
        return forked

    @staticmethod
    def _copy_rows(store: torch.Tensor, rows: torch.Tensor, part: slice) -> torch.Tensor:
        out = store.new_empty((len(rows),) + tuple(store.shape[1:]))
        out[:, :, part] = store[rows.to(store.device), :, part]
        return out

    def reorder_rows(self, rows: torch.Tensor, start: int = 0) -> None:
        """Row i takes old row rows[i]'s positions [start, length) in place (beam search: each beam
        continues a chosen one; positions before `start` are the same in every row)."""
        if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            return
        for name in self.STORES:
            for store in getattr(self, name):
                part = store[:, :, self.span(name, start, self.length)]
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
        self.keys = self._allocate(layers, self.shape, self.CODES, device)
        self.values = self._allocate(layers, self.shape, self.CODES, device)
        meta = self.shape[:3] + (self.META,)  # fp32: what the native kernel reads, 6% of the codes
        self.key_scales = self._allocate(layers, meta, torch.float32, device)
        self.value_scales = self._allocate(layers, meta, torch.float32, device)

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
        keys, values, key_scales, value_scales = (getattr(self, name)[layer][:, :, self.span(name, 0, end)]
                                                  for name in ("keys", "values", "key_scales", "value_scales"))
        return causal_attention(q, keys, values, key_scales, value_scales)


KEY_BLOCK = 32  # attention.c's and decode.c's: positions per block of an int4 cache's key scales


class Int4KVCache(Int8KVCache):
    """Keys and values as 4-bit codes 0..15 (value = code * scale + min): about a third of a
    bf16 cache (MiniCPM-2B: 0.13 MB per token).

    Values take a scale and a minimum per (token, head). Keys take them per channel, over blocks
    of KEY_BLOCK positions (as KIVI does): a few channels of a key are far larger than the rest,
    so one scale per key vector leaves the others a code or two. SmolLM2 at 8k tokens: +10.8%
    perplexity with per-vector keys, +1.6% with per-channel blocks of 32 (docs/speed.md).

    The newest block of each row is still growing: its keys are kept in fp32 as well (`key_tail`),
    and every write takes the block's scales again over all of it and rewrites its codes, so the
    codes always hold every written position. Writing can therefore resume only where a tail is
    kept: at the end of what the cache holds, or at a block boundary (`resumable`, `ALIGN`).

    Each 16 values of a head vector take 8 bytes, byte j holding value j (low nibble) and value
    j + 8 (high nibble), so the native kernels widen 16 codes with two masks and one unpack.
    Stores are padded to whole blocks of positions.
    """

    CODES = torch.uint8
    META = 2  # values: scale, min
    STORES = Int8KVCache.STORES + ("key_tail",)
    ALIGN = KEY_BLOCK

    def _allocate_stores(self, layers: int, device: Any) -> None:
        batch, kv, length, d = self.shape
        padded = -(-length // KEY_BLOCK) * KEY_BLOCK
        self.keys = self._allocate(layers, (batch, kv, padded, d // 2), self.CODES, device)
        self.values = self._allocate(layers, (batch, kv, padded, d // 2), self.CODES, device)
        # [scales; mins] per channel and block: 8 / KEY_BLOCK bytes per value
        self.key_scales = self._allocate(layers, (batch, kv, padded // KEY_BLOCK, 2, d), torch.float32, device)
        self.value_scales = self._allocate(layers, (batch, kv, padded, self.META), torch.float32, device)
        self.key_tail = self._allocate(layers, (batch, kv, KEY_BLOCK, d), torch.float32, device)

    def span(self, name: str, start: int, end: int) -> slice:
        if name == "key_tail":
            return slice(None)
        if name == "key_scales":
            return slice(start // KEY_BLOCK, -(-end // KEY_BLOCK))
        if name == "keys":  # a block's codes go with its scales
            return slice(start - start % KEY_BLOCK, end)
        return slice(start, end)

    def resumable(self, n: int) -> int:
        """n at a block boundary or in the block the tail holds (that of the last position
        written, `length`); else the block boundary before it."""
        if n % KEY_BLOCK == 0 or (n <= self.length and n // KEY_BLOCK == self.length // KEY_BLOCK):
            return n
        return n - n % KEY_BLOCK

    @staticmethod
    def _encode(x: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Packed codes [..., D/2] of x [..., D] float32."""
        codes = torch.round((x - low) / scale).clamp(0, 15).to(torch.uint8)
        pairs = codes.unflatten(-1, (-1, 2, 8))  # [..., D/16, (low, high), 8]
        return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).flatten(-2)

    @staticmethod
    def _unpack(codes: torch.Tensor) -> torch.Tensor:
        chunks = codes.unflatten(-1, (-1, 8))
        return torch.stack([chunks & 15, chunks >> 4], -2).flatten(-3).float()

    @staticmethod
    def _range(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, min) over `dim`: (max - min) / 15 clamped at 1e-8, as decode.c takes them."""
        low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        return ((high - low) / 15).clamp(min=1e-8), low

    def _quantize(self, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Value vectors [..., D]: packed codes [..., D/2] and fp32 (scale, min) [..., 2]."""
        x = new.float()
        scale, low = self._range(x, -1)
        return self._encode(x, low, scale), torch.cat([scale, low], -1)

    def _decode(self, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self._unpack(codes).mul_(meta[..., :1]).add_(meta[..., 1:])

    def _store_blocks(self, layer: int, rows, blocks: torch.Tensor, first: torch.Tensor | int) -> None:
        """Quantize fp32 key blocks [R, KV, n, KEY_BLOCK, D] per channel into rows `rows` (a
        slice, or a tensor with one block each) from position `first` (a block boundary)."""
        scale, low = self._range(blocks, -2)
        codes = self._encode(blocks, low, scale).flatten(2, 3)
        meta = torch.cat([scale, low], -2)  # [R, KV, n, 2, D]
        if isinstance(rows, slice):
            self.keys[layer][rows, :, first:first + codes.shape[2]] = codes
            self.key_scales[layer][rows, :, first // KEY_BLOCK:first // KEY_BLOCK + meta.shape[2]] = meta
        else:  # advanced indexing puts the indexed axes first: [R, KEY_BLOCK, KV, D/2]
            positions = first[:, None] + torch.arange(KEY_BLOCK, device=first.device)
            self.keys[layer][rows[:, None], :, positions] = codes.transpose(1, 2)
            self.key_scales[layer][rows, :, first // KEY_BLOCK] = meta[:, :, 0]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        start, end = self.length, self.length + k.shape[2]
        self.values[layer][:, :, start:end], self.value_scales[layer][:, :, start:end] = self._quantize(v)
        first = start - start % KEY_BLOCK  # the tail holds positions [first, start)
        x = torch.cat([self.key_tail[layer][:, :, :start - first], k.float()], 2)
        n = x.shape[2]
        last = (n - 1) // KEY_BLOCK * KEY_BLOCK  # where the last block starts in x
        # the last block padded with copies of its first key: its minima and maxima stay its own
        padded = torch.cat([x, x[:, :, last:last + 1].expand(-1, -1, -n % KEY_BLOCK, -1)], 2)
        self._store_blocks(layer, slice(None), padded.unflatten(2, (-1, KEY_BLOCK)), first)
        self.key_tail[layer][:, :, :n - last] = x[:, :, last:]
        return end

    def write_rows(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
        self.values[layer][rows, :, positions], self.value_scales[layer][rows, :, positions] = self._quantize(v[:, :, 0])
        tail, offsets = self.key_tail[layer], positions % KEY_BLOCK
        tail[rows, :, offsets] = k[:, :, 0].float()
        blocks = tail[rows]  # [R, KV, KEY_BLOCK, D]; past each row's offset: its first key, as in write
        valid = torch.arange(KEY_BLOCK, device=offsets.device) <= offsets[:, None]
        blocks = torch.where(valid[:, None, :, None], blocks, blocks[:, :, :1])
        self._store_blocks(layer, rows, blocks[:, :, None], positions - offsets)

    def _dequantized(self, layer: int, part: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, heads, positions = part
        start, end = positions.start or 0, positions.stop
        first = start - start % KEY_BLOCK
        blocks = self.key_scales[layer][rows, heads, self.span("key_scales", start, end)]  # [.., n, 2, D]
        codes = self.keys[layer][rows, heads, first:first + blocks.shape[2] * KEY_BLOCK]
        keys = self._unpack(codes).unflatten(2, (-1, KEY_BLOCK)).mul_(blocks[..., :1, :]).add_(blocks[..., 1:, :])
        values = self._decode(self.values[layer][part], self.value_scales[layer][part])
        return keys.flatten(2, 3)[:, :, start - first:end - first].to(self.dtype), values.to(self.dtype)


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
    memory of bf16, "int4" in about a third."""
    if kind not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kind!r}")
    if kind == "int4" and config.head_dim % 16:
        raise ValueError(f"an int4 KV cache needs a head_dim that is a multiple of 16, not {config.head_dim}")
    cls = _QUANTIZED_CACHES.get(kind, KVCache)
    return cls(config, batch_size, max_len, dtype=dtype, device=device)
