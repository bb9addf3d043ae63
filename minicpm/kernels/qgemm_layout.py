"""qgemm.c's weight layouts and call arguments in numpy: no PyTorch, so that both the PyTorch
model (`qgemm`, which wraps these) and the torch-free runtime (`minicpm.lean`) pack weights the
same way.

Layouts (see the C file): tiles of ROWS output rows,
    int4: bytes [tile][k/32][4][16 rows][4], low nibble k = 4L+b, high nibble k = 16+4L+b
    int8: bytes [tile][k/32][8][16 rows][4], code + 128
    int6: bytes [tile][k/32][6][16 rows][4], int4's 4 of bits 0-3 then 2 of bits 4-5 (GGUF's Q6_K)
    scales, zeros or offsets: [tile][group][16] (int8 per row: scales [tile*16])
Rows past N are zero codes with zero scales. Packed weights big enough to matter live in 2 MB
aligned arenas advised for transparent huge pages (`weight_buffer`).
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import numpy as np

ABI_VERSION = 9  # qgemm.c's qgemm_abi_version()
FORM_SYMMETRIC = 2  # qgemm.c's int4 form without zero points: w = (q - 8) * s
FORM_SUPERBLOCK = 3  # qgemm.c's form of GGUF's super-blocks as stored: Q4_K (int4) w = q * (d sc) - dmin mn,
                     # Q6_K (int6) w = (q - 32) * (d sc)
ROWS = 16  # output rows per tile: one per 32-bit lane of a zmm register
KIND_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}  # element types the C side reads

# ---------------------------------------------------------------- weight memory

_HUGE = 2 << 20          # a transparent huge page
_ARENA = 32 << 20        # weights are carved from arenas of this size (the current one stays mapped)
_SMALL = 256 << 10       # below this, TLB misses do not matter: ordinary memory
_arena: dict = {"buf": None, "used": 0}
_arena_lock = threading.Lock()


def _huge_block(nbytes: int) -> np.ndarray:
    """uint8 [nbytes] at a 2 MB boundary of private anonymous memory advised for huge pages.

    With 4 KB pages every 4 KB of a streamed weight costs a TLB miss (a 400 MB model overflows
    the TLB many times): measured 1-thread int4 GEMV from DRAM 20.6 -> 27.6 GB/s with huge pages.
    Neither PyTorch's allocator nor numpy's asks for them, and THP is commonly set to `madvise`.
    """
    size = -(-nbytes // _HUGE) * _HUGE
    mm = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so faults map huge pages directly
    full = np.frombuffer(mm, dtype=np.uint8)  # keeps the mapping alive
    start = -full.ctypes.data % _HUGE
    return full[start:start + nbytes]


def weight_buffer(nbytes: int) -> np.ndarray:
    """uint8 memory for a packed weight: huge-page arenas for big ones, else numpy's."""
    if nbytes >= _SMALL and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            if nbytes > _ARENA // 4:
                return _huge_block(nbytes)
            with _arena_lock:
                buf, used = _arena["buf"], _arena["used"]
                if buf is None or used + nbytes > buf.size:
                    buf, used = _huge_block(_ARENA), 0
                _arena["buf"], _arena["used"] = buf, used + -(-nbytes // 64) * 64
                # an arena is freed once the current one moved on and its weights are gone
                return buf[used:used + nbytes]
        except (OSError, ValueError):
            pass
    return np.empty(nbytes, dtype=np.uint8)


def _placed(packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A copy of `packed` (a strided view) in weight memory (or in `out`, uint8 of its size),
    written in place: no temporary."""
    out = weight_buffer(packed.nbytes) if out is None else out
    out.view(packed.dtype).reshape(packed.shape)[...] = packed
    return out


def _pad_rows(q: np.ndarray, value: int = 0) -> np.ndarray:
    n = q.shape[0]
    t = -(-n // ROWS)
    q = np.ascontiguousarray(q)
    if n == t * ROWS:
        return q
    return np.pad(q, ((0, t * ROWS - n),) + ((0, 0),) * (q.ndim - 1), constant_values=value)


# The byte shuffles move 4-byte groups as int32 and combine nibbles 8 bytes at a time as int64
# (codes are < 16, so a 4-bit shift never carries into the next byte): 10x faster than per-byte
# indexing, which matters at load time (~0.4 G codes for MiniCPM-1B).

# Each pack_* takes `out`: where to write (uint8 of the packed size; default new weight memory).
# Rows in tiles of 16 are independent, so a tensor can be packed a slice of rows at a time into
# the matching slice of one buffer.

def _nibble_tiles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (0..15, K % 32 == 0) -> int32 [tile, k/32, L, row]: the int4 layout."""
    k = q.shape[1]
    halves = _pad_rows(q).reshape(-1, k // 32, 2, 16).view(np.int64)   # [row, block, half, 2 x 8 bytes]
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)                  # [row, block, 2]: bytes (L, b)
    packed = np.ascontiguousarray(packed).view(np.int32).reshape(-1, ROWS, k // 32, 4)  # [tile, row, block, L]
    return packed.transpose(0, 2, 3, 1)


def pack_int4(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 codes [N, K] (0..15, K % 32 == 0) -> the tiled nibble layout, uint8 [T*K*8]."""
    return _placed(_nibble_tiles(q), out)


def pack_int6(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 codes [N, K] (0..63, K % 32 == 0) -> the tiled 6-bit layout, uint8 [T*K*12]: per 32 k
    the nibble loads of bits 0-3, then two loads of bits 4-5 where byte b of a row holds
    k = 16P + 4L + b (load P) at bits 2L, 2L + 1."""
    k = q.shape[1]
    high = (_pad_rows(q) >> 4).reshape(-1, k // 32, 2, 4, 4)               # [row, block, P, L, b]
    high = np.bitwise_or.reduce(high << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1), axis=3)
    high = np.ascontiguousarray(high).view(np.int32).reshape(-1, ROWS, k // 32, 2)  # [tile, row, block, P]
    return _placed(np.concatenate((_nibble_tiles(q & 0x0F), high.transpose(0, 2, 3, 1)), axis=2), out)


def pack_int4_blocks(nibbles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [N, K/2] whose 16 bytes per 32-k block hold k = j (low) and 16 + j (high), GGUF's
    Q4_0/Q4_1 order, which is the tile's own byte order: only 4-byte groups move."""
    half = nibbles.shape[1]
    v = _pad_rows(nibbles).view(np.int32).reshape(-1, ROWS, half // 16, 4)  # [tile, row, block, L]
    return _placed(v.transpose(0, 2, 3, 1), out)


def pack_int8(q: np.ndarray, k_padded: int, out: np.ndarray | None = None) -> np.ndarray:
    """int8 codes [N, K] -> codes + 128 in the tiled layout, uint8 [T*Kp*16]. (Padding is code 0;
    the + 128 is applied to the packed copy in place, so a big table costs no second temporary.)"""
    k = q.shape[1]
    u = np.ascontiguousarray(q).view(np.uint8)
    if k_padded != k:
        u = np.pad(u, ((0, 0), (0, k_padded - k)))
    v = _pad_rows(u).view(np.int32).reshape(-1, ROWS, k_padded // 32, 8)  # [tile, row, block, L]
    out = _placed(v.transpose(0, 2, 3, 1), out)
    np.bitwise_xor(out, np.uint8(0x80), out=out)                         # q + 128, in two's complement
    return out


# A super-block's metadata fields as (bytes per value, values): Q4_K d, dmin (fp16), 8 scales and 8
# mins (bytes); Q6_K d (fp16), 16 scales (int8).
SUPERBLOCK_FIELDS = {4: ((2, 1), (2, 1), (1, 8), (1, 8)), 6: ((2, 1), (1, 16))}


def pack_superblock_meta(rows: np.ndarray, bits: int = 4) -> np.ndarray:
    """Super-block metadata [N, S * R] bytes (per super-block its SUPERBLOCK_FIELDS[bits], R bytes)
    -> qgemm.c's form 3 layout, uint8 [T, S, 16 R]: per tile and super-block each field for the 16
    rows together, value by value: Q4_K d [16], dmin [16], sc [8][16], mn [8][16]; Q6_K d [16],
    sc [16][16] (rows past N: 0)."""
    fields = SUPERBLOCK_FIELDS[bits]
    width = sum(size * count for size, count in fields)
    blocks = _pad_rows(rows).reshape(-1, ROWS, rows.shape[1] // width, width).transpose(0, 2, 1, 3)  # [T, S, 16, R]
    parts, at = [], 0
    for size, count in fields:
        field = blocks[..., at:at + size * count].reshape(*blocks.shape[:3], count, size)   # [T, S, row, value, byte]
        parts.append(field.transpose(0, 1, 3, 2, 4).reshape(*blocks.shape[:2], -1))         # [T, S, value, row, byte]
        at += size * count
    return np.concatenate(parts, axis=2)


def pack_meta(m: np.ndarray) -> np.ndarray:
    """[N, G] per-row-and-group values (any element type) -> [T, G, 16] (rows past N: 0)."""
    g = m.shape[1]
    return np.ascontiguousarray(_pad_rows(m).reshape(-1, ROWS, g).transpose(0, 2, 1))


# ---------------------------------------------------------------- the call

def act_block(bits: int, group_size: int | None, k_padded: int) -> int:
    """Values of x per int8 scale: 32, llama.cpp's q8_0 block (accuracy over a few % speed)."""
    return 32


def padded_k(bits: int, in_features: int, group_size: int | None) -> int:
    return in_features if bits in (4, 6) else -(-in_features // 32) * 32


class Plan(ctypes.Structure):
    """A layer's fixed kernel arguments (struct qplan in the C file); `keep` holds what it points into."""
    _fields_ = [("bits", ctypes.c_int), ("G", ctypes.c_int), ("QB", ctypes.c_int), ("mk", ctypes.c_int),
                ("bkind", ctypes.c_int), ("pad", ctypes.c_int), ("K", ctypes.c_long), ("Kp", ctypes.c_long),
                ("N", ctypes.c_long), ("w", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("zc", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("form", ctypes.c_int), ("pad2", ctypes.c_int), ("perm", ctypes.c_void_p)]


def make_plan(bits: int, group_size: int | None, n: int, k: int, k_padded: int, weight: int, scales: int,
              scale_kind: str, zeros: int | None = None, bias: int | None = None, bias_kind: str | None = None,
              offsets: bool = False, keep=(), superblocks: bool = False, perm: int | None = None) -> Plan:
    """The plan of one layer from the addresses of its packed parts (which must stay where they are).
    int4: `zeros` holds zero points, or offsets m (w = q*s + m) with offsets=True; no `zeros`:
    w = (q - 8) * s (GGUF's Q4_0); `superblocks`: `scales` holds GGUF Q4_K (int4, groups of 32) or
    Q6_K (bits 6, groups of 16) metadata as pack_superblock_meta lays it out. int8: group_size None for a scale per row,
    else scales [T, K/G, 16] per group (16 or 32j). `perm`: int64 [K], stored column j multiplies x's
    column perm[j] (the kernel gathers x)."""
    form = FORM_SUPERBLOCK if superblocks else FORM_SYMMETRIC if bits == 4 and zeros is None else int(offsets)
    p = Plan(bits, group_size or 0, act_block(bits, group_size, k_padded), KIND_CODES[scale_kind],
             0 if bias_kind is None else KIND_CODES[bias_kind], 0, k, k_padded, n, weight, scales, zeros, bias,
             form, 0, perm)
    p.keep = keep
    p.ref = ctypes.byref(p)
    return p
