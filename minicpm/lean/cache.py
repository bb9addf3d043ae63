"""The lean runtime's KV cache: numpy stores of one sequence in the layouts decode.c reads.

The kinds of `minicpm.cache` (its KVCache, Int8KVCache and Int4KVCache, with a batch of one)
under the same `--kv-cache` names, and f16 and bf16:

  fp32  keys and values as the activations are (the PyTorch model's cache for these files)
  f16   rounded to IEEE fp16 ("auto", as llama.cpp's default cache): half of fp32, and half the
        bytes a decoded token reads from the cache (MiniCPM-2B at 512 tokens: 377 MB in fp32, a
        fifth of the weights: its decode 13.0 -> 16.8 tok/s); 3 more bits of mantissa than bf16.
        SmolLM2's perplexity on 1000 tokens of WikiText-2 went 24.08 -> 24.19 (int8 24.20, int4
        24.36), and a seeded reply loops as often as with fp32 (2 of 6 seeds each)
  bf16  rounded to bf16: as f16, with fp32's range
  int8  int8 codes with one fp32 scale per (position, head): a quarter of fp32
  int4  4-bit codes; values with (scale, min) per (position, head), keys with (scale, min) per
        channel over blocks of KEY_BLOCK positions and the newest block's keys kept in fp32 too
        (decode.c rewrites a block's codes from them as it grows): about an eighth of fp32

MiniCPM-2B has no GQA: an fp32 cache is 737 KB a token (1.5 GB at 2k tokens), int8 196 KB, int4
about 130 KB. Stores grow (doubling, at least GROWTH positions) one layer at a time, so a short chat
never holds a whole context's cache and a growing one never holds two copies of it. They are
fresh anonymous maps: a page is resident once written, so the unwritten end of a doubled store
costs nothing, and a store let go is unmapped at once (numpy's zeros came from the heap, which
had to clear recycled pages and kept freed ones).
"""

from __future__ import annotations

import mmap

import numpy as np

from minicpm.config import MiniCPMConfig

KINDS = {"fp32": 0, "f16": 16, "bf16": 16, "int8": 8, "int4": 4}  # -> decode.c's kv_bits (and kv_fp16)
ALIASES = {"auto": "f16"}  # --kv-cache's default
KEY_BLOCK = 32  # decode.c's and attention.c's: positions per block of int4 key scales
GROWTH = 256    # positions added at a time (a multiple of KEY_BLOCK)


def cache_kind(name: str) -> str:
    """A --kv-cache name as one of KINDS (ValueError naming the choices for anything else)."""
    kind = ALIASES.get(name, name)
    if kind not in KINDS:
        raise ValueError(f"KV cache kind {name!r}: expected one of {', '.join([*ALIASES, *KINDS])}")
    return kind


class LeanCache:
    """Per layer, the stores decode.c's layer struct points at (`stores[i]`: field -> array)."""

    def __init__(self, config: MiniCPMConfig, kind: str = "auto"):
        kind = cache_kind(kind)
        self.config, self.kind, self.bits = config, kind, KINDS[kind]
        self.fp16 = kind == "f16"  # else a 16-bit cache is bf16
        self.capacity = 0
        self.stores: list[dict[str, np.ndarray]] = []

    def _layout(self, capacity: int) -> dict[str, tuple[tuple[int, ...], type, int]]:
        """field -> (shape, dtype, positions per index of axis 2; 0: not along positions)."""
        kv, d = self.config.num_key_value_heads, self.config.head_dim
        if self.bits in (0, 16):
            plain = ((1, kv, capacity, d), np.float32 if self.bits == 0 else np.uint16, 1)  # f16/bf16: their bits
            return {"kstore": plain, "vstore": plain}
        if self.bits == 8:
            codes, scales = ((1, kv, capacity, d), np.int8, 1), ((1, kv, capacity, 1), np.float32, 1)
            return {"kstore": codes, "vstore": codes, "kscale": scales, "vscale": scales}
        codes = ((1, kv, capacity, d // 2), np.uint8, 1)
        return {"kstore": codes, "vstore": codes,
                "kscale": ((1, kv, capacity // KEY_BLOCK, 2, d), np.float32, KEY_BLOCK),
                "vscale": ((1, kv, capacity, 2), np.float32, 1),
                "ktail": ((1, kv, KEY_BLOCK, d), np.float32, 0)}

    def reserve(self, length: int, held: int, layers) -> None:
        """At least `length` positions, keeping the first `held`; `layers` (decode.c's structs)
        are pointed at the stores."""
        if length <= self.capacity:
            return
        c = self.config
        capacity = min(max(length, self.capacity * 2, GROWTH), c.max_position_embeddings)
        capacity = -(-capacity // KEY_BLOCK) * KEY_BLOCK  # int4 keys take whole blocks
        layout = self._layout(capacity)
        for i in range(c.num_hidden_layers):  # one layer at a time: old and new never all at once
            new = {field: _lazy_zeros(shape, dtype) for field, (shape, dtype, _) in layout.items()}
            if i < len(self.stores):
                for field, (_, _, per) in layout.items():
                    keep = slice(None) if per == 0 else slice(0, -(-held // per))
                    new[field][:, :, keep] = self.stores[i][field][:, :, keep]
                self.stores[i] = new
            else:
                self.stores.append(new)
            for field, array in new.items():
                setattr(layers[i], field, array.ctypes.data)
        self.capacity = capacity

    def resumable(self, n: int, held: int) -> int:
        """Where writing can resume at or before position n, with `held` positions written: n,
        except in an int4 cache, whose fp32 key tail holds only the block of the last position
        written: there n at a block boundary or in that block, else the block boundary before n
        (the positions from there on are run again)."""
        if self.bits != 4 or n % KEY_BLOCK == 0 or (n <= held and n // KEY_BLOCK == (held - 1) // KEY_BLOCK):
            return n
        return n - n % KEY_BLOCK

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.stores for a in layer.values())


def _lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in a private anonymous map of its own (kept alive by the array)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shared memory
    return np.frombuffer(memory, dtype, int(np.prod(shape))).reshape(shape)
