"""Rotary embedding in one native pass forward and one backward (rotary.c says why), bitwise
model.apply_rotary's Python expression and its autograd; `apply` returns None where the kernel
does not serve (not built, not the CPU, fp16, a head_dim over 512, cos/sin that need gradients)."""

from __future__ import annotations

import ctypes

import torch

from minicpm.kernels.build import KernelUnavailable
from minicpm.kernels.libraries import ROTARY

ABI = 1
KINDS = {torch.float32: 0, torch.bfloat16: 1}


def setup(lib: ctypes.CDLL) -> None:
    if lib.minicpm_rotary_abi() != ABI:
        raise KernelUnavailable("rotary.c: stale build")
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.minicpm_rotary.argtypes = [ctypes.c_void_p, ctypes.c_int, i64p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, i64p, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.minicpm_rotary.restype = ctypes.c_int
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.rand(2, 1, 5, 16, generator=g) * 2 - 1
    for dtype in KINDS:
        x = torch.randn(2, 5, 3, 16, generator=g).to(dtype).transpose(1, 2)  # [B, H, S, D], a view
        grad = torch.randn(2, 3, 5, 16, generator=g).to(dtype)
        xf = x.float()
        ref = (xf * cos[:, None] + torch.cat((-xf[..., 8:], xf[..., :8]), -1) * sin[:, None]).to(dtype)
        gf = grad.float()
        gs = gf * sin[:, None]
        ref_grad = (gf * cos[:, None] + torch.cat((gs[..., 8:], -gs[..., :8]), -1)).to(dtype)
        if not (torch.equal(_run(lib, x, cos, sin, False), ref) and torch.equal(_run(lib, grad, cos, sin, True), ref_grad)):
            raise KernelUnavailable("rotary.c: self-check failed")


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [B, H, S, D] rotated by cos/sin [B or 1, S, D] (fp32), in x's dtype and layout; None
    where the kernel does not serve."""
    if not (x.device.type == "cpu" and x.dtype in KINDS and x.dim() == 4 and x.shape[-1] % 2 == 0
            and x.shape[-1] <= 512 and cos.dtype is torch.float32 and sin.dtype is torch.float32
            and cos.shape == sin.shape and cos.dim() == 3 and cos.shape[0] in (1, x.shape[0])
            and cos.shape[1:] == x.shape[2:] and not (cos.requires_grad or sin.requires_grad)):
        return None
    lib = ROTARY.library()
    if lib is None:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return _run(lib, x, cos, sin, False)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _run(ROTARY.library(), x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _run(ROTARY.library(), grad, cos, sin, True), None, None


def _run(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The rotation (or, `backward`, its transpose: the gradient of x from the output's) of x
    [B, H, S, D] (D contiguous) into a tensor of x's dtype and strides."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)
    if y.stride(-1) != 1:
        y = torch.empty(x.shape, dtype=x.dtype)
    b, h, s, d = x.shape
    xs, ys = (ctypes.c_int64 * 3)(*x.stride()[:3]), (ctypes.c_int64 * 3)(*y.stride()[:3])
    rc = lib.minicpm_rotary(x.data_ptr(), KINDS[x.dtype], xs, cos.data_ptr(), sin.data_ptr(),
                            s if cos.shape[0] > 1 else 0, y.data_ptr(), KINDS[y.dtype], ys, b, h, s, d,
                            int(backward), torch.get_num_threads())
    if rc:
        raise ValueError(f"rotary.c refused head_dim {d}")
    return y
