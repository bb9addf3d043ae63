"""The three kernels the lean runtime calls (qgemm.c, attention.c, decode.c), loaded without
PyTorch: the PyTorch modules' setups check a build against PyTorch, so here the ABI numbers are
checked and one int4 and one int8 product are compared with numpy before anything is trusted.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from minicpm.kernels import decode_abi
from minicpm.kernels import qgemm_layout as layout
from minicpm.kernels.build import KernelUnavailable, prebuild
from minicpm.kernels.libraries import ATTENTION, DECODE, QGEMM

USED = (QGEMM, ATTENTION, DECODE)


class Kernels:
    """The loaded libraries and the entry points decode.c calls by address."""

    def __init__(self):
        prebuild(USED)  # on a cold cache the three compile two at a time, not one after another
        self.qgemm, self.attention, self.decode = (k.unchecked_library() for k in USED)
        if self.qgemm.qgemm_abi_version() != layout.ABI_VERSION:
            raise KernelUnavailable("qgemm.c: stale build")
        if self.attention.minicpm_attention_abi() != decode_abi.ATTENTION_ABI:
            raise KernelUnavailable("attention.c: stale build")
        decode_abi.declare(self.decode)
        c_long, c_int, c_void = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
        self.qgemm.qgemm_plan.argtypes = [ctypes.POINTER(layout.Plan), c_void, c_int, c_long, c_void, c_int]
        self.qgemm.qgemm_plan.restype = c_int
        self.plan_team = _address(self.qgemm, "qgemm_plan_team")
        self.plan_scratch = _address(self.qgemm, "qgemm_plan_scratch")
        self.attention_team = _address(self.attention, "minicpm_decode_attention_team")
        self.chunk_attention = (_address(self.attention, "minicpm_chunk_attention_team"),
                                _address(self.attention, "minicpm_chunk_attention_floats"))
        _self_check(self)

    def matmul(self, plan: layout.Plan, x: np.ndarray, threads: int) -> np.ndarray:
        """x [M, K] float32 (contiguous) @ W.T -> [M, N] float32."""
        y = np.empty((x.shape[0], plan.N), np.float32)
        rc = self.qgemm.qgemm_plan(plan.ref, x.ctypes.data, 0, x.shape[0], y.ctypes.data, threads)
        if rc:
            raise MemoryError("native qgemm: out of memory") if rc == -1 else RuntimeError(f"native qgemm failed ({rc})")
        return y


def _address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _self_check(kernels: Kernels) -> None:
    """int4 (offsets; zero point 8; Q4_K super-blocks), int6 (Q6_K super-blocks) and int8 (groups
    of 32) products on odd shapes against numpy."""
    rng = np.random.default_rng(0)
    n, k = 37, 128
    q4 = rng.integers(0, 16, (n, k), dtype=np.uint8)
    s4 = (rng.random((n, k // 32), dtype=np.float32) + 0.5).astype(np.float32)
    m4 = (rng.random((n, k // 32), dtype=np.float32) - 0.5).astype(np.float32)
    w4 = (q4.reshape(n, -1, 32) * s4[..., None] + m4[..., None]).reshape(n, k)
    q8 = rng.integers(-127, 128, (n, k), dtype=np.int8)
    s8 = (rng.random((n, k // 32), dtype=np.float32) + 0.5).astype(np.float32)
    w8 = (q8.reshape(n, -1, 32) * s8[..., None]).reshape(n, k)
    symmetric = ((q4.astype(np.float32) - 8).reshape(n, -1, 32) * s4[..., None]).reshape(n, k)
    # Q4_K's super-blocks (one of 256): fp16 d and dmin, 6-bit scales and mins per 32
    d, dmin = (rng.random((2, n, 1), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
    sc, mn = rng.integers(0, 64, (2, n, 8), dtype=np.uint8)
    q4k = rng.integers(0, 16, (n, 256), dtype=np.uint8)
    meta = np.concatenate((d.view(np.uint8), dmin.view(np.uint8), sc, mn), axis=1)
    w4k = (q4k.reshape(n, 8, 32) * (d.astype(np.float32) * sc)[..., None]
           - (dmin.astype(np.float32) * mn)[..., None]).reshape(n, 256)
    # Q6_K's: 6-bit codes, fp16 d, int8 scales per 16
    q6k = rng.integers(0, 64, (n, 256), dtype=np.uint8)
    sc6 = rng.integers(-128, 128, (n, 16), dtype=np.int8)
    meta6 = np.concatenate((d.view(np.uint8), sc6.view(np.uint8)), axis=1)
    w6k = ((q6k.astype(np.float32) - 32).reshape(n, 16, 16) * (d.astype(np.float32) * sc6)[..., None]).reshape(n, 256)
    for plan, w, rows in ((quantized_plan(4, 32, layout.pack_int4(q4), s4, m4, n, k), w4, k),
                          (quantized_plan(4, 32, layout.pack_int4(q4), s4, None, n, k), symmetric, k),
                          (quantized_plan(8, 32, layout.pack_int8(q8, k), s8, None, n, k), w8, k),
                          (packed_plan(4, 32, layout.pack_int4(q4k), layout.pack_superblock_meta(meta), None, n,
                                       256, superblocks=True), w4k, 256),
                          (packed_plan(6, 16, layout.pack_int6(q6k), layout.pack_superblock_meta(meta6, 6), None, n,
                                       256, superblocks=True), w6k, 256)):
        x = rng.standard_normal((3, rows), dtype=np.float32)
        ref = x @ w.T
        err = np.linalg.norm(kernels.matmul(plan, x, 1) - ref) / np.linalg.norm(ref)
        if not err < 0.02:
            raise KernelUnavailable(f"qgemm.c: self-check failed (relative error {err:.3g})")


def quantized_plan(bits: int, group: int, packed: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
                   n: int, k: int) -> layout.Plan:
    """The plan of a packed weight with per-group scales [N, K/G] (and int4 offsets [N, K/G]):
    w = q * s + m (int4), (q - 8) * s (int4 without offsets), q * s (int8)."""
    return packed_plan(bits, group, packed, layout.pack_meta(scales),
                       None if offsets is None else layout.pack_meta(offsets), n, k)


def packed_plan(bits: int, group: int, packed: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
                n: int, k: int, superblocks: bool = False) -> layout.Plan:
    """quantized_plan of metadata already in the tiles' layout (layout.pack_meta's [T, K/G, 16]; with
    `superblocks`, Q4_K's (bits 4) or Q6_K's (bits 6) as layout.pack_superblock_meta lays it out)."""
    if superblocks:
        return layout.make_plan(bits, group, n, k, layout.padded_k(bits, k, group), packed.ctypes.data,
                                scales.ctypes.data, "float16", keep=(packed, scales), superblocks=True)
    kind = scales.dtype.name
    if kind not in layout.KIND_CODES:
        raise ValueError(f"qgemm reads no {kind} metadata (it reads {', '.join(layout.KIND_CODES)})")
    if offsets is not None and offsets.dtype != scales.dtype:
        raise ValueError(f"scales ({kind}) and offsets ({offsets.dtype.name}) must share one type: convert both")
    return layout.make_plan(bits, group, n, k, layout.padded_k(bits, k, group), packed.ctypes.data,
                            scales.ctypes.data, kind, None if offsets is None else offsets.ctypes.data,
                            offsets=offsets is not None, keep=(packed, scales, offsets))


@functools.cache
def kernels() -> Kernels:
    """The kernels, loaded once (KernelUnavailable says why they cannot be)."""
    return Kernels()
