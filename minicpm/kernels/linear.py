"""bf16 Linear for decoding (a few rows of x) by the native kernel, or None where it does not serve."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from minicpm.kernels.build import AVX512, Kernel, KernelUnavailable

ABI = 1
MAX_ROWS = 16  # past this many rows of x, oneDNN's blocked GEMM beats a weight stream


def _setup(lib: ctypes.CDLL) -> None:
    if lib.minicpm_linear_bf16_abi() != ABI:
        raise KernelUnavailable("linear_bf16.c: stale build")
    c_ptr, c_i64 = ctypes.c_void_p, ctypes.c_int64
    lib.minicpm_linear_bf16.argtypes = [c_ptr, c_i64, c_i64, c_ptr, c_i64, c_ptr, c_ptr, ctypes.c_int]
    lib.minicpm_linear_bf16.restype = None
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 70, generator=g), torch.randn(9, 70, generator=g), torch.randn(9, generator=g)
    got = _call(lib, x.bfloat16(), w.bfloat16(), b.bfloat16())
    ref = torch.nn.functional.linear(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float())
    if not torch.allclose(got.float(), ref, rtol=0.02, atol=0.05):
        raise KernelUnavailable("linear_bf16.c: self-check against PyTorch failed")


KERNEL = Kernel(Path(__file__).with_name("linear_bf16.c"), "bf16 linear kernel", _setup,
                required_flags=AVX512 + ("avx512_bf16",))


def _call(lib, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    lib.minicpm_linear_bf16(x2.data_ptr(), m, k, weight.data_ptr(), n,
                            None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for bf16 CPU tensors and at most MAX_ROWS rows; else None."""
    if (x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16 or not x.is_cpu
            or not weight.is_contiguous() or weight.requires_grad and torch.is_grad_enabled()):
        return None
    k = weight.shape[1]
    if x.shape[-1] != k or x.numel() > MAX_ROWS * k or (bias is not None and bias.dtype is not torch.bfloat16):
        return None
    lib = KERNEL.library()
    if lib is None:
        return None
    y = _call(lib, x.reshape(-1, k).contiguous(), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])
