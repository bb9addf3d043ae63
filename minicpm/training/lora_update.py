"""The LoRA update scaling * B(A(dropout(x))) as one autograd function that keeps little for
the backward pass.

Built from nn.Dropout and two nn.Linear, autograd keeps per adapter a float mask of x's size
and the dropped-out copy of x cast for A's product: 6 bytes per input value under bf16
autocast, 7 adapters a layer, most of the activations of a LoRA step. Here the backward pass
gets x itself (the same tensor for the adapters that read it: q, k and v share one; gate and
up another), A's small output, and the random generator's state the mask was drawn from; the
mask and the dropped-out x are drawn again in the backward pass. Products, casts and their
order are those of the module version, so results match it given the same mask (tested).

On the CPU the mask is the native kernel's (minicpm/kernels/dropout.c): a hash of a seed drawn
from PyTorch's generator and the position, applied, scaled and cast in one pass (~35x faster than
bernoulli_ and the products; 7 adapters a layer made dropout a third of a LoRA step), and hashed
again in the backward pass. Elsewhere (GPUs, fp16) it is bernoulli_'s, drawn again from the
generator's saved state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minicpm.kernels import dropout as native


def low_rank_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dropout: float,
                    scaling: float) -> torch.Tensor:
    """scaling * B A dropout(x) in the compute dtype: autocast's where it is on, else A's."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
    return _LowRankUpdate.apply(x, a, b, dropout, scaling, dtype)


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that draws x's dropout mask: the device's own on a GPU."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _LowRankUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, dropout: float, scaling: float, dtype: torch.dtype):
        # the mask: a seed for the native kernel's hash, or the generator's state for bernoulli_
        seed = native.draw_seed() if dropout and native.available(x, dtype) else None
        rng = _rng_state(x.device) if dropout and seed is None else None
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(_dropped(x, dropout, dtype, seed), a.to(dtype))
            if _power_of_two(scaling):
                out = F.linear(h, b.to(dtype) * scaling)
            else:
                out = F.linear(h, b.to(dtype)) * scaling
        ctx.save_for_backward(x, a, b, h)
        ctx.dropout, ctx.scaling, ctx.dtype, ctx.rng, ctx.seed = dropout, scaling, dtype, rng, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h = ctx.saved_tensors
        dtype = ctx.dtype
        grad_x = grad_a = grad_b = None
        with torch.autocast(x.device.type, enabled=False):
            grad, b_used = grad.to(dtype), b.to(dtype)  # scaling * grad, by way of B where that is exact
            small = _power_of_two(ctx.scaling)
            if small:
                b_used = b_used * ctx.scaling
            else:
                grad = grad * ctx.scaling
            if ctx.needs_input_grad[2]:
                grad_b = grad.flatten(0, -2).T @ h.flatten(0, -2)
                grad_b = (grad_b * ctx.scaling if small else grad_b).to(b.dtype)
            grad_h = grad @ b_used
            if ctx.seed is not None:  # the native kernel's mask, hashed again
                if ctx.needs_input_grad[1]:
                    dropped = native.dropped(x, ctx.dropout, ctx.seed, dtype)
                    grad_a = (grad_h.flatten(0, -2).T @ dropped.flatten(0, -2)).to(a.dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = native.dropped(grad_h @ a.to(dtype), ctx.dropout, ctx.seed, x.dtype)
            elif ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                cuda = [x.device.index or 0] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):  # the forward pass's mask, drawn again
                    if ctx.rng is not None:
                        _set_rng_state(x.device, ctx.rng)
                    mask = _mask(x, ctx.dropout)
                if ctx.needs_input_grad[1]:
                    dropped = _apply(x, mask, ctx.dropout).to(dtype)
                    grad_a = (grad_h.flatten(0, -2).T @ dropped.flatten(0, -2)).to(a.dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = _apply((grad_h @ a.to(dtype)).to(x.dtype), mask, ctx.dropout)
        return grad_x, grad_a, grad_b, None, None, None


def _power_of_two(scaling: float) -> bool:
    """Whether multiplying by `scaling` is exact (barring overflow and subnormals): then it is
    applied to B ([out, r]) instead of the output ([..., out]), bitwise the same product and
    ~out/r times fewer multiplies (alpha / r is 2 or 4 in the usual settings)."""
    return scaling > 0 and math.frexp(scaling)[0] == 0.5


def _mask(x: torch.Tensor, dropout: float) -> torch.Tensor | None:
    """What nn.Dropout draws: keep with probability 1 - dropout (None: keep everything)."""
    return torch.empty_like(x).bernoulli_(1 - dropout) if dropout else None


def _apply(x: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    return x if mask is None else x * mask * (1 / (1 - dropout))


def _dropped(x: torch.Tensor, dropout: float, dtype: torch.dtype, seed: int | None) -> torch.Tensor:
    if seed is not None:
        return native.dropped(x, dropout, seed, dtype)
    return _apply(x, _mask(x, dropout), dropout).to(dtype)
