"""Linear for decoding (a few rows of x) by the native weight-stream kernels, or None where they
do not serve: bf16 (linear_bf16.c, faster than oneDNN's GEMV) and fp32 (linear_f32.c, which keeps
each row's sums independent of how many rows there are, unlike MKL's). `linear_gemm` for many
rows at once (the vision tower's patches), GELU fused where it can be. And `linear_widened`: bf16 products
as fp32 GEMMs on CPUs that have no bf16 arithmetic, where PyTorch's own bf16 GEMM is emulated."""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from minicpm.kernels.build import Kernel, KernelUnavailable, cpu_flags, is_x86
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


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The product by this module's kernels where one serves, or None (the caller runs F.linear):
    the weight-stream kernel for x's dtype when decoding (fp32 only for one position per
    sequence, x [..., 1, K], where batching must not change a row; a short prefill keeps MKL's
    sums, as a long one does), and for bf16 on a CPU without bf16 arithmetic the widened GEMM."""
    if x.dtype is torch.bfloat16:
        y = linear_bf16(x, weight, bias)
        return y if y is not None or not widens(x, weight, bias) else linear_widened(x, weight, bias)
    if x.dtype is torch.float32 and x.dim() >= 2 and x.shape[-2] == 1:
        return linear_f32(x, weight, bias)
    return None


@functools.cache
def bf16_is_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Without it, PyTorch's
    and oneDNN's bf16 GEMMs convert in software: 15-21 GFLOP/s on 2 AVX2 cores of an AMD EPYC
    (Zen 3) for the vision tower's 1024-row products, against 97-129 for the same products in
    fp32. Other architectures are left to PyTorch."""
    if not is_x86():
        return True
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def widens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether F.linear(x, weight, bias) is a bf16 CPU product that `linear_widened` runs
    faster here: no bf16 arithmetic in the CPU, and no gradient asked for."""
    return (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.is_cpu and weight.is_cpu
            and (bias is None or bias.dtype is torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not bf16_is_native())


# fp32 values of each buffer in linear_widened (32 MiB): a head's [122753, 2304] is never widened
# whole; with 2^21 the vision tower's products over 6 tiles ran 4-15% slower (Zen 3, 2 threads)
WIDEN_BLOCK = 2 ** 23


def linear_widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   gelu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) (then exact GELU) of bf16 tensors, by fp32 GEMMs over blocks
    of the weight's rows widened to fp32, each block's output rounded to bf16 once. The
    arithmetic of a bf16 GEMM with fp32 sums (a product of two bf16 values is exact in fp32);
    the sums run in another order. Memory beyond y: three fp32 buffers (weight rows, x rows,
    output block) of at most WIDEN_BLOCK values, made once per call and reused by every block:
    fresh temporaries of each block's size left glibc's heap ~300 MB larger after a 7-slice
    image (MiniCPM-V, int4 decoder: peak 3.5 GB)."""
    k, n = x.shape[-1], weight.shape[0]
    if weight.shape[-1] != k:
        raise RuntimeError(f"linear: x has {k} features, the weight {tuple(weight.shape)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cols = min(n, max(64, WIDEN_BLOCK // max(k, 1)))  # weight rows widened at a time
    rows = min(m, max(64, WIDEN_BLOCK // max(k, cols)))  # rows of x (and of the fp32 output) at a time
    w32, x32, o32 = torch.empty(cols, k), torch.empty(rows, k), torch.empty(rows * cols)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    for c in range(0, n, cols):
        w = w32[:min(cols, n - c)]
        w.copy_(weight[c:c + len(w)])
        b32 = None if bias is None else bias[c:c + len(w)].float()
        for r in range(0, m, rows):
            xb = x32[:min(rows, m - r)]
            xb.copy_(x2[r:r + len(xb)])
            out = o32[:len(xb) * len(w)].view(len(xb), len(w))
            if b32 is None:
                torch.mm(xb, w.t(), out=out)
            else:
                torch.addmm(b32, xb, w.t(), out=out)
            if gelu:
                torch.ops.aten.gelu_(out)  # exact GELU, in place
            y[r:r + len(xb), c:c + len(w)] = out
    return y.reshape(*x.shape[:-1], n)


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


def linear_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), then exact GELU if asked, for many rows of x (a vision tower's
    1024 patches), by the faster GEMM for this CPU: bf16 without bf16 arithmetic widened
    (`linear_widened`); on an AVX-512 CPU oneDNN's GEMM on the weight as stored, with GELU
    fused; elsewhere F.linear (MKL for fp32 on x86). Measured on 2 threads, the vision tower's
    products (1024-6144 rows; 1152 <-> 4304, 3456): on a quiet AMD EPYC Zen 4, fp32 oneDNN
    185-212 GFLOP/s against MKL's 163-197 (bf16 is oneDNN's either way, ~400); on a Zen 3 (AVX2),
    MKL 156-175 against oneDNN's 141-150."""
    if widens(x, weight, bias):
        return linear_widened(x, weight, bias, gelu)
    return _gemm(x, weight, bias, gelu)


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """linear_gemm but never widened: fp32, and bf16 where the CPU has bf16 arithmetic."""
    if (_ONEDNN_LINEAR is not None and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16)
            and x.dtype not in _ONEDNN_REFUSED and onednn_is_faster()
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


@functools.cache
def onednn_is_faster() -> bool:
    """Whether oneDNN's GEMM beats F.linear's here (see linear_gemm): on x86 CPUs with AVX-512
    and on other architectures (where F.linear has no MKL), not on AVX2-only x86."""
    return not is_x86() or "avx512f" in cpu_flags()


def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
