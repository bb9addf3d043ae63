"""Dropout in one native pass whose mask is a hash of (seed, position): drawn again for free in
the backward pass (dropout.c says why). `dropped(x, p, seed, dtype)` is x * mask / (1 - p) cast
to dtype, exactly as PyTorch computes that product from the same mask; `keep_mask` gives the
mask itself (tests, and the fallback where the kernel cannot serve)."""

from __future__ import annotations

import ctypes

import torch

from minicpm.kernels.build import KernelUnavailable
from minicpm.kernels.libraries import DROPOUT

ABI = 1
KINDS = {torch.float32: 0, torch.bfloat16: 1}
_SEED_BITS = 62


def setup(lib: ctypes.CDLL) -> None:
    if lib.minicpm_dropout_abi() != ABI:
        raise KernelUnavailable("dropout.c: stale build")
    lib.minicpm_dropout.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                    ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
    lib.minicpm_dropout.restype = None
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        y = _run(lib, x, 0.25, 7, dtype)
        kept = y != 0
        if not torch.equal(y[kept], (x[kept] * (1 / 0.75)).to(dtype)) or not 0.7 < kept.float().mean() < 0.8:
            raise KernelUnavailable("dropout.c: self-check failed")


def draw_seed() -> int:
    """A mask's seed from PyTorch's CPU generator (so torch.manual_seed makes runs repeatable)."""
    return int(torch.randint(0, 1 << _SEED_BITS, (1,)))


def threshold(p: float) -> int:
    """keep(i) is bits24 < this: probability 1 - p in steps of 2^-24."""
    return round((1 - p) * (1 << 24))


def available(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel serves dropout of x (and of gradients like x) into `dtype` and back."""
    return x.device.type == "cpu" and x.dtype in KINDS and dtype in KINDS and DROPOUT.library() is not None


def dropped(x: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """x * mask * (1 / (1 - p)) as `dtype` (fp32 or bf16), the mask that of (seed, p)."""
    return _run(DROPOUT.library(), x, p, seed, dtype)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int) -> torch.Tensor:
    """The fp32 0/1 mask `dropped` applies for (shape, p, seed)."""
    return (dropped(torch.ones(shape), p, seed, torch.float32) != 0).float()


def _run(lib: ctypes.CDLL, x: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=dtype)
    lib.minicpm_dropout(x.data_ptr(), KINDS[x.dtype], y.data_ptr(), KINDS[dtype], x.numel(), seed, threshold(p),
                        1 / (1 - p), torch.get_num_threads())
    return y
