"""The native int4/int8 weight-only GEMM (qgemm.c) behind QuantizedLinear, and its layouts.

Built and loaded by `minicpm.kernels.build` (AVX-512 VNNI, or AVX2 through avx512_on_avx2.h). `library()` returns None,
after one warning that says why, where the kernel cannot serve: MINICPM_NATIVE=0, another CPU,
no working compiler, or a self-check that disagrees with plain arithmetic. QuantizedLinear then
uses PyTorch's kernels.

Layouts (see the C file): tiles of 16 output rows,
    int4: bytes [tile][k/32][4][16 rows][4], low nibble k = 4L+b, high nibble k = 16+4L+b
    int8: bytes [tile][k/32][8][16 rows][4], code + 128
    scales, zeros or offsets: [tile][group][16] (int8 per row: scales [tile*16])
int4 is w = (q - z) * s (zero points) or w = q * s + m (offsets: GGUF's Q4_0/Q4_1/Q4_K blocks);
int8 has a scale per row (group_size None) or per group of 16 or 32j along k (Q6_K, Q8_0).
Rows past N are zero codes with zero scales. Big packed weights live in 2 MB-aligned arenas
advised for transparent huge pages (`weight_buffer`).
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import torch

from minicpm.kernels.build import KernelUnavailable
from minicpm.kernels.libraries import QGEMM as KERNEL

ROWS = 16  # output rows per tile: one per 32-bit lane of a zmm register
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # dtype codes the C side reads
ABI_VERSION = 4

_lock = threading.Lock()  # guards the huge-page arena
_lib: ctypes.CDLL | None = None  # what run() calls; set once the library passed its self-check


def setup(lib: ctypes.CDLL) -> None:
    global _lib
    if lib.qgemm_abi_version() != ABI_VERSION:
        raise KernelUnavailable("qgemm.c: stale build")
    c_long, c_int, c_void = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    lib.qgemm.argtypes = [c_int, c_void, c_int, c_long, c_long, c_long, c_long, c_int, c_int,
                          c_void, c_void, c_void, c_int, c_void, c_int, c_void, c_int, c_int]
    lib.qgemm.restype = c_int
    lib.qgemm_plan.argtypes = [ctypes.POINTER(Plan), c_void, c_int, c_long, c_void, c_int]
    lib.qgemm_plan.restype = c_int
    _lib = lib
    try:
        _self_check()
    except KernelUnavailable:
        _lib = None
        raise


def library() -> ctypes.CDLL | None:
    return KERNEL.library()


def reason() -> str | None:
    """Why the kernel is not used (None when it is, or before the first library() call)."""
    return KERNEL.reason


def available() -> bool:
    return library() is not None


# ---------------------------------------------------------------- layouts (torch ops: any device)

def act_block(bits: int, group_size: int | None, k_padded: int) -> int:
    """Values of x per int8 scale: 32, llama.cpp's q8_0 block (accuracy over a few % speed)."""
    return 32


def padded_k(bits: int, in_features: int, group_size: int | None) -> int:
    return in_features if bits == 4 else -(-in_features // 32) * 32


# ---------------------------------------------------------------- weight memory

_HUGE = 2 << 20          # a transparent huge page
_ARENA = 32 << 20        # weights are carved from arenas of this size (the current one stays mapped)
_SMALL = 256 << 10       # below this, TLB misses do not matter: plain torch memory
_arena: dict = {"buf": None, "used": 0}
_arena_lock = threading.Lock()


def _huge_block(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] at a 2 MB boundary of private anonymous memory advised for huge pages.

    With 4 KB pages every 4 KB of a streamed weight costs a TLB miss (a 400 MB model overflows
    the TLB many times): measured 1-thread int4 GEMV from DRAM 20.6 -> 27.6 GB/s with huge pages.
    PyTorch's allocator does not ask for them, and THP is commonly set to `madvise`.
    """
    size = -(-nbytes // _HUGE) * _HUGE
    mm = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so faults map huge pages directly
    full = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive
    start = -full.data_ptr() % _HUGE
    return full[start:start + nbytes]


def weight_buffer(nbytes: int) -> torch.Tensor:
    """Memory for a packed weight: huge-page arenas for big ones, else torch.empty."""
    if nbytes >= _SMALL and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            if nbytes > _ARENA // 4:
                return _huge_block(nbytes)
            with _arena_lock:
                buf, used = _arena["buf"], _arena["used"]
                if buf is None or used + nbytes > buf.numel():
                    buf, used = _huge_block(_ARENA), 0
                _arena["buf"], _arena["used"] = buf, used + -(-nbytes // 64) * 64
                # an arena is freed once the current one moved on and its weights are gone
                return buf[used:used + nbytes]
        except (OSError, ValueError, RuntimeError):
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


def _placed(packed: torch.Tensor) -> torch.Tensor:
    # Arenas outlive the call: made under inference_mode they would be inference tensors, which a
    # layer built later outside it could not be copied into.
    with torch.inference_mode(False):
        out = weight_buffer(packed.numel())
        out.copy_(packed)
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a storage offset that allows an int64 view."""
    if not t.is_contiguous() or t.storage_offset() % 8:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _pad_rows(q: torch.Tensor, value: int = 0) -> torch.Tensor:
    n = q.shape[0]
    t = -(-n // ROWS)
    return q if n == t * ROWS else torch.nn.functional.pad(q, (0, 0, 0, t * ROWS - n), value=value)


# The byte shuffles below move 4-byte groups as int32 and combine nibbles 8 bytes at a time as
# int64 (codes are < 16, so a 4-bit shift never carries into the next byte): 10x faster than
# per-byte indexing, which matters at load time (~0.4 G codes for MiniCPM-1B).

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15, K % 32 == 0) -> the tiled nibble layout, uint8 [T*K*8]."""
    n, k = q.shape
    q = _aligned(_pad_rows(q))
    halves = q.view(-1, k // 32, 2, 16).view(torch.int64)            # [row, block, half, 2 x 8 bytes]
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)                # [row, block, 2]: bytes (L, b)
    packed = packed.view(torch.int32).view(-1, ROWS, k // 32, 4)     # [tile, row, block, L] x 4 bytes
    return _placed(packed.permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(-1))


def pack_int4_blocks(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] whose 16 bytes per 32-k block hold k = j (low) and 16 + j (high), GGUF's
    Q4_0/Q4_1 order, which is the tile's own byte order: only 4-byte groups move."""
    n, half = nibbles.shape
    v = _aligned(_pad_rows(nibbles)).view(torch.int32).view(-1, ROWS, half // 16, 4)  # [tile, row, block, L]
    return _placed(v.permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(-1))


def block_nibbles_to_codes(nibbles: torch.Tensor) -> torch.Tensor:
    """pack_int4_blocks' input -> uint8 codes [N, K]."""
    n, half = nibbles.shape
    b = nibbles.reshape(n, half // 16, 16)
    return torch.cat((b & 15, b >> 4), dim=-1).reshape(n, 2 * half)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    t = -(-n // ROWS)
    v = _aligned(packed).view(torch.int32).view(t, k // 32, 4, ROWS)  # [tile, block, L, row]
    v = v.permute(0, 3, 1, 2).contiguous().view(torch.int64)          # [tile, row, block, 2 x 8 bytes]
    mask = 0x0F0F0F0F0F0F0F0F
    q = torch.stack((v & mask, (v >> 4) & mask), dim=3)               # [tile, row, block, half, 2]
    return q.view(torch.uint8).reshape(t * ROWS, k)[:n]


def pack_int8(q: torch.Tensor, k_padded: int) -> torch.Tensor:
    """int8 codes [N, K] -> codes + 128 in the tiled layout, uint8 [T*Kp*16]."""
    n, k = q.shape
    u = q.contiguous().view(torch.uint8) ^ 0x80                       # q + 128, in two's complement
    if k_padded != k:
        u = torch.nn.functional.pad(u, (0, k_padded - k), value=128)
    u = _aligned(_pad_rows(u, 128))
    v = u.view(torch.int32).view(-1, ROWS, k_padded // 32, 8)        # [tile, row, block, L] x 4 bytes
    return _placed(v.permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(-1))


def _int8_view(packed: torch.Tensor, n: int, k_padded: int) -> torch.Tensor:
    t = -(-n // ROWS)
    return packed.view(t, k_padded // 32, 8, ROWS, 4)


def unpack_int8(packed: torch.Tensor, n: int, k: int, k_padded: int) -> torch.Tensor:
    t = -(-n // ROWS)
    v = _aligned(packed).view(torch.int32).view(t, k_padded // 32, 8, ROWS).permute(0, 3, 1, 2).contiguous()
    return (v.view(torch.uint8).reshape(t * ROWS, k_padded)[:n, :k] ^ 0x80).view(torch.int8)


def int8_rows(packed: torch.Tensor, n: int, k: int, k_padded: int, index: torch.Tensor) -> torch.Tensor:
    """Codes (as int16, offset removed) of rows `index` (1-D), gathered straight from the tiles."""
    v = _int8_view(packed, n, k_padded)
    rows = v[index // ROWS, :, :, index % ROWS, :]       # [len, block, L, b]
    return rows.reshape(len(index), k_padded)[:, :k].to(torch.int16) - 128


def int4_rows(packed: torch.Tensor, n: int, k: int, index: torch.Tensor) -> torch.Tensor:
    """Codes (uint8 0..15) of rows `index` (1-D), gathered straight from the tiles."""
    v = _aligned(packed).view(torch.int32).view(-(-n // ROWS), k // 32, 4, ROWS)
    rows = v[index // ROWS, :, :, index % ROWS].contiguous().view(torch.uint8)  # [len, block, L*4 + b]
    return torch.cat((rows & 15, rows >> 4), dim=-1).reshape(len(index), k)     # low: k 0..15, high: 16..31


def meta_rows(meta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of packed metadata [T, G, 16] -> [len, G]."""
    return meta[index // ROWS, :, index % ROWS]


def pack_meta(m: torch.Tensor) -> torch.Tensor:
    """[N, G] per-row-and-group floats -> [T, G, 16] (rows past N: 0)."""
    n, g = m.shape
    t = -(-n // ROWS)
    m = torch.nn.functional.pad(m, (0, 0, 0, t * ROWS - n))
    return m.reshape(t, ROWS, g).transpose(1, 2).contiguous()


def unpack_meta(m: torch.Tensor, n: int) -> torch.Tensor:
    t, g, _ = m.shape
    return m.transpose(1, 2).reshape(t * ROWS, g)[:n]


# ---------------------------------------------------------------- the call

class Plan(ctypes.Structure):
    """A layer's fixed kernel arguments (struct qplan in the C file). Holds its tensors alive."""
    _fields_ = [("bits", ctypes.c_int), ("G", ctypes.c_int), ("QB", ctypes.c_int), ("mk", ctypes.c_int),
                ("bkind", ctypes.c_int), ("pad", ctypes.c_int), ("K", ctypes.c_long), ("Kp", ctypes.c_long),
                ("N", ctypes.c_long), ("w", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("zc", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("form", ctypes.c_int), ("pad2", ctypes.c_int)]


def plan(bits: int, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int,
         k_padded: int, group_size: int | None, bias: torch.Tensor | None, offsets: bool = False) -> Plan:
    """Arguments for `run`. Tensors must stay where they are (a layer rebuilds its plan on .to()).

    int4: `zeros` holds zero points, or offsets m (w = q*s + m) with offsets=True. int8:
    group_size None for a scale per row, else scales [T, K/G, 16] per group (16 or 32j)."""
    for t in (weight, scales, zeros, bias):
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError("native kernel tensors must be contiguous and on the CPU")
    p = Plan(bits, group_size or 0, act_block(bits, group_size, k_padded), KINDS[scales.dtype],
             0 if bias is None else KINDS[bias.dtype], 0, k, k_padded, n, weight.data_ptr(), scales.data_ptr(),
             None if zeros is None else zeros.data_ptr(), None if bias is None else bias.data_ptr(), int(offsets), 0)
    p.tensors = (weight, scales, zeros, bias)
    p.ref = ctypes.byref(p)
    return p


def run(p: Plan, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [..., K] contiguous fp32/bf16 on the CPU; y [..., N] in x's dtype."""
    y = torch.empty(x.shape[:-1] + (p.N,), dtype=x.dtype)
    m = x.numel() // p.K
    rc = m and _lib.qgemm_plan(p.ref, x.data_ptr(), KINDS[x.dtype], m, y.data_ptr(), threads or torch.get_num_threads())
    if rc == -1:
        raise MemoryError("native qgemm: out of memory for its activation scratch")
    if rc:
        raise ValueError(f"native qgemm: int8 group size {p.G} is not 16 or a multiple of 32")
    return y


def gemm(x2: torch.Tensor, bits: int, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         n: int, k: int, k_padded: int, group_size: int | None, bias: torch.Tensor | None,
         threads: int | None = None, offsets: bool = False) -> torch.Tensor:
    """One-off form of plan() + run()."""
    return run(plan(bits, weight, scales, zeros, n, k, k_padded, group_size, bias, offsets), x2, threads)


def _self_check() -> None:
    """Every layout and form against plain float arithmetic on small odd shapes; a miscompile
    disables the kernel."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 37, 128, 32
    x = torch.randn(3, k, generator=g)
    q4 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s4 = torch.rand(n, k // group, generator=g) + 0.5
    z4 = torch.rand(n, k // group, generator=g) * 15
    w4 = ((q4.float().reshape(n, -1, group) - z4[..., None]) * s4[..., None]).reshape(n, k)
    y4 = gemm(x, 4, pack_int4(q4), pack_meta(s4), pack_meta(z4), n, k, k, group, None, 1)
    m4 = -z4 * s4  # offsets: the same weight as q * s + m
    y4o = gemm(x, 4, pack_int4(q4), pack_meta(s4), pack_meta(m4), n, k, k, group, None, 1, offsets=True)
    q8 = torch.randint(-127, 128, (n, k - 8), generator=g, dtype=torch.int8)
    s8 = torch.rand(n, generator=g) + 0.5
    kp = padded_k(8, k - 8, None)
    y8 = gemm(x[:, :k - 8].contiguous(), 8, pack_int8(q8, kp), pack_meta(s8[:, None]).reshape(-1), None,
              n, k - 8, kp, None, None, 1)
    checks = [(y4, x @ w4.T), (y4o, x @ w4.T), (y8, x[:, :k - 8] @ (q8.float() * s8[:, None]).T)]
    for g8 in (16, 32, 64):  # int8 per group: Q6_K's 16, Q8_0's 32, and two blocks per group
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, k // g8, generator=g) + 0.5
        w = (q.float().reshape(n, -1, g8) * s[..., None]).reshape(n, k)
        checks.append((gemm(x, 8, pack_int8(q, k), pack_meta(s), None, n, k, k, g8, None, 1), x @ w.T))
    for y, ref in checks:
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < 0.02:
            raise KernelUnavailable(f"qgemm.c: self-check failed (relative error {err:.3g})")
