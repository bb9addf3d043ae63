"""The native int4/int8 weight-only GEMM (qgemm.c) behind QuantizedLinear, and its layouts.

Built and loaded by `minicpm.kernels.build` (AVX-512 VNNI, or AVX2 through avx512_on_avx2.h). `library()` returns None,
after one warning that says why, where the kernel cannot serve: MINICPM_NATIVE=0, another CPU,
no working compiler, or a self-check that disagrees with plain arithmetic. QuantizedLinear then
uses PyTorch's kernels.

Layouts and plans are `qgemm_layout`'s (numpy: the torch-free runtime packs the same way); this
module wraps them for tensors and unpacks them again (torch ops, any device). int4 is
w = (q - z) * s (zero points) or w = q * s + m (offsets: GGUF's Q4_0/Q4_1/Q4_K blocks); int8 has
a scale per row (group_size None) or per group of 16 or 32j along k (Q6_K, Q8_0).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from minicpm.kernels import qgemm_layout as layout
from minicpm.kernels.build import KernelUnavailable
from minicpm.kernels.libraries import QGEMM as KERNEL
from minicpm.kernels.qgemm_layout import ROWS, Plan

KINDS = {getattr(torch, name): code for name, code in layout.KIND_CODES.items()}  # dtype codes the C side reads
ABI_VERSION = layout.ABI_VERSION

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


# ---------------------------------------------------------------- layouts (packing: qgemm_layout)

act_block, padded_k = layout.act_block, layout.padded_k


def _tensor(packed: np.ndarray) -> torch.Tensor:
    # Packed weights outlive the call: made under inference_mode they would be inference tensors,
    # which a layer built later outside it could not be copied into.
    with torch.inference_mode(False):
        return torch.from_numpy(packed)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15, K % 32 == 0) -> the tiled nibble layout, uint8 [T*K*8]."""
    return _tensor(layout.pack_int4(_array(q)))


def pack_int4_blocks(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in GGUF's Q4_0/Q4_1 nibble order -> the tiled layout (layout.pack_int4_blocks)."""
    return _tensor(layout.pack_int4_blocks(_array(nibbles)))


def pack_int8(q: torch.Tensor, k_padded: int) -> torch.Tensor:
    """int8 codes [N, K] -> codes + 128 in the tiled layout, uint8 [T*Kp*16]."""
    return _tensor(layout.pack_int8(_array(q), k_padded))


def pack_meta(m: torch.Tensor) -> torch.Tensor:
    """[N, G] per-row-and-group floats -> [T, G, 16] (rows past N: 0); moved as raw bits (numpy has no bf16)."""
    raw = m.detach().contiguous().view(torch.int16 if m.element_size() == 2 else torch.int32)
    return _tensor(layout.pack_meta(raw.numpy())).view(m.dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a storage offset that allows an int64 view."""
    if not t.is_contiguous() or t.storage_offset() % 8:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


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


def unpack_meta(m: torch.Tensor, n: int) -> torch.Tensor:
    t, g, _ = m.shape
    return m.transpose(1, 2).reshape(t * ROWS, g)[:n]


# ---------------------------------------------------------------- the call

def plan(bits: int, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int,
         k_padded: int, group_size: int | None, bias: torch.Tensor | None, offsets: bool = False,
         perm: torch.Tensor | None = None) -> Plan:
    """Arguments for `run`. Tensors must stay where they are (a layer rebuilds its plan on .to()).

    int4: `zeros` holds zero points, or offsets m (w = q*s + m) with offsets=True. int8:
    group_size None for a scale per row, else scales [T, K/G, 16] per group (16 or 32j).
    `perm` (int64 [K], a permutation): the weight's column j multiplies x's column perm[j]; the
    kernel gathers x's columns as it quantizes them (GPTQ act-order layers)."""
    for t in (weight, scales, zeros, bias, perm):
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError("native kernel tensors must be contiguous and on the CPU")
    if perm is not None and (perm.dtype is not torch.int64 or perm.shape != (k,)):
        raise ValueError(f"perm must be int64 [{k}], got {perm.dtype} {tuple(perm.shape)}")
    address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return layout.make_plan(bits, group_size, n, k, k_padded, weight.data_ptr(), scales.data_ptr(),
                            str(scales.dtype).removeprefix("torch."), address(zeros), address(bias),
                            None if bias is None else str(bias.dtype).removeprefix("torch."), offsets,
                            keep=(weight, scales, zeros, bias, perm), perm=address(perm))


def run(p: Plan, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [..., K] contiguous fp32/bf16 on the CPU; y [..., N] in x's dtype."""
    if _lib is None and library() is None:  # built and checked on first use; else say why not
        raise KernelUnavailable(f"native qgemm is unavailable: {reason()}")
    y = torch.empty(x.shape[:-1] + (p.N,), dtype=x.dtype)
    m = x.numel() // p.K
    rc = m and _lib.qgemm_plan(p.ref, x.data_ptr(), KINDS[x.dtype], m, y.data_ptr(), threads or torch.get_num_threads())
    if rc == -1:
        raise MemoryError("native qgemm: out of memory for its activation scratch")
    if rc:
        raise ValueError(f"native qgemm: group size {p.G} is not one the int{p.bits} tiles take (int4: multiples of 32; "
                         "int8: 16 or multiples of 32)")
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
    y4s = gemm(x, 4, pack_int4(q4), pack_meta(s4), None, n, k, k, group, None, 1)  # zero point 8 (Q4_0)
    w4s = ((q4.float().reshape(n, -1, group) - 8) * s4[..., None]).reshape(n, k)
    q8 = torch.randint(-127, 128, (n, k - 8), generator=g, dtype=torch.int8)
    s8 = torch.rand(n, generator=g) + 0.5
    kp = padded_k(8, k - 8, None)
    y8 = gemm(x[:, :k - 8].contiguous(), 8, pack_int8(q8, kp), pack_meta(s8[:, None]).reshape(-1), None,
              n, k - 8, kp, None, None, 1)
    perm = torch.randperm(k, generator=g)  # act-order: the kernel gathers x's columns
    y4p = run(plan(4, pack_int4(q4), pack_meta(s4), pack_meta(z4), n, k, k, group, None, perm=perm), x, 1)
    checks = [(y4, x @ w4.T), (y4o, x @ w4.T), (y4s, x @ w4s.T), (y8, x[:, :k - 8] @ (q8.float() * s8[:, None]).T),
              (y4p, x[:, perm] @ w4.T)]
    for g8 in (16, 32, 64):  # int8 per group: Q6_K's 16, Q8_0's 32, and two blocks per group
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, k // g8, generator=g) + 0.5
        w = (q.float().reshape(n, -1, g8) * s[..., None]).reshape(n, k)
        checks.append((gemm(x, 8, pack_int8(q, k), pack_meta(s), None, n, k, k, g8, None, 1), x @ w.T))
    for y, ref in checks:
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < 0.02:
            raise KernelUnavailable(f"qgemm.c: self-check failed (relative error {err:.3g})")
