"""Linear for decoding (a few rows of x) by the native weight-stream kernels, or None where they
do not serve: bf16 (linear_bf16.c, faster than oneDNN's GEMV) and fp32 (linear_f32.c, which keeps
each row's sums independent of how many rows there are, unlike MKL's). And `linear_onednn` for
many rows at once (the vision tower's patches), with GELU fused."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from minicpm.kernels.build import Kernel, KernelUnavailable
from minicpm.kernels.libraries import LINEAR_BF16 as KERNEL
from minicpm.kernels.libraries import LINEAR_F32 as KERNEL_F32

ABI = 2
MAX_ROWS = 16  # past this many rows of x, oneDNN's blocked GEMM beats a weight stream


def _checked_setup(name: str, dtype: torch.dtype, rtol: float, atol: float):
    """Setup of the weight-stream kernel `linear_<name>.c`: its ABI, its argument types, and one
    product checked against PyTorch, so a miscompiled build is refused rather than trusted."""
    def setup(lib: ctypes.CDLL) -> None:
        if getattr(lib, f"minicpm_linear_{name}_abi")() != ABI:
            raise KernelUnavailable(f"linear_{name}.c: stale build")
        function = getattr(lib, f"minicpm_linear_{name}")
        c_ptr, c_i64 = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [c_ptr, c_i64, c_i64, c_ptr, c_i64, c_ptr, c_ptr, ctypes.c_int]
        function.restype = None
        g = torch.Generator().manual_seed(0)
        x, w, b = (t.to(dtype) for t in (torch.randn(6, 70, generator=g), torch.randn(37, 70, generator=g),
                                         torch.randn(37, generator=g)))
        got = _call(function, x, w, b)
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
        if not torch.allclose(got.float(), ref, rtol=rtol, atol=atol):
            raise KernelUnavailable(f"linear_{name}.c: self-check against PyTorch failed")
    return setup


setup_bf16 = _checked_setup("bf16", torch.bfloat16, rtol=0.02, atol=0.05)
setup_f32 = _checked_setup("f32", torch.float32, rtol=1e-4, atol=1e-4)


def _call(function, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype)
    function(x2.data_ptr(), m, k, weight.data_ptr(), n, None if bias is None else bias.data_ptr(), y.data_ptr(),
             torch.get_num_threads())
    return y


def _run(kernel: Kernel, name: str, dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor,
         bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) by `kernel` for `dtype` CPU tensors and at most MAX_ROWS rows; else None."""
    if (x.dtype is not dtype or weight.dtype is not dtype or not x.is_cpu or not weight.is_contiguous()
            or torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)):  # no backward here
        return None
    k = weight.shape[1]
    if x.shape[-1] != k or x.numel() > MAX_ROWS * k or (bias is not None and bias.dtype is not dtype):
        return None
    lib = kernel.library()
    if lib is None:
        return None
    bias = None if bias is None else bias.contiguous()
    y = _call(getattr(lib, name), x.reshape(-1, k).contiguous(), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for bf16 CPU tensors and at most MAX_ROWS rows; else None."""
    return _run(KERNEL, "minicpm_linear_bf16", torch.bfloat16, x, weight, bias)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for fp32 CPU tensors and at most MAX_ROWS rows (each row's
    result independent of the row count); else None."""
    return _run(KERNEL_F32, "minicpm_linear_f32", torch.float32, x, weight, bias)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The native kernel for x's dtype, or None (the caller runs F.linear). fp32 takes it only
    for one position per sequence (x [..., 1, K]: decoding), where batching must not change a
    row; a short prefill keeps MKL's sums, as a long one does."""
    if x.dtype is torch.bfloat16:
        return linear_bf16(x, weight, bias)
    if x.dtype is torch.float32 and x.dim() >= 2 and x.shape[-2] == 1:
        return linear_f32(x, weight, bias)
    return None


def _onednn_op():
    """oneDNN's linear with a fused activation (the op PyTorch's compiler emits for CPU), if
    this build has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_op()
_ONEDNN_REFUSED: set[torch.dtype] = set()  # dtypes oneDNN has no primitive for on this CPU


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  gelu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), then exact GELU if asked, for many rows of x (a vision tower's
    1024 patches): oneDNN's GEMM on the weight as stored, for fp32 and bf16 CPU tensors; F.linear
    (and F.gelu) elsewhere. The same arithmetic, faster: PyTorch sends fp32 products to MKL,
    which on our AMD EPYC (Zen 4) ran a 1024x1152x4304 product at 34 GFLOP/s on 2 threads
    against oneDNN's 73; in bf16 (both oneDNN) 93 -> 113, the bias no longer copied into the
    output first."""
    if (_ONEDNN_LINEAR is not None and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16)
            and x.dtype not in _ONEDNN_REFUSED
            and weight.dtype is x.dtype and (bias is None or bias.dtype is x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        try:
            # "gelu" with algorithm "none" is the erf form (the tanh one would say "tanh")
            return _ONEDNN_LINEAR(x.contiguous(), weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        except RuntimeError:  # no primitive for this dtype on this CPU (bf16 below AVX-512)?
            y = _linear_gelu(x, weight, bias, gelu)  # a bad input raises here, and disables nothing
            _ONEDNN_REFUSED.add(x.dtype)
            return y
    return _linear_gelu(x, weight, bias, gelu)


def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
