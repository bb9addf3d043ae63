"""AWQ (Lin et al. 2023) for one decoder layer, as AutoAWQ does it (`awq/quantize/quantizer.py`).

Per scaling group (a norm or Linear `prev` feeding `linears`, whose output `inspect` checks):
  x_mean[c] = mean |x[:, c]| over the calibration tokens
  w_mean[c] = mean over the group's rows of |w[r, c]| / max |w| of (r's group of G columns)
  for alpha in 0, 1/20, ..., 19/20 ("duo scaling"):
      s = x_mean^alpha / (w_mean^(1-alpha) + 1e-4), clamped >= 1e-4, divided by sqrt(max s * min s)
      loss = mean (inspect(x) with W*s fake-quantized and divided by s  -  inspect(x) float)^2
  the best s is folded in: prev's output channels / s (RMSNorm weight, or a Linear's rows), the
  linears' input columns * s; the function of the float layer is unchanged.
Then per Linear (except q/k, whose errors the softmax amplifies), clip search: for each group of
G inputs, max |w| shrunk by (1 - i/20), i < 10, keeping the one whose fake-quantized output on
<= 512 sampled tokens is closest; weights are clamped to it. Then round to nearest on AutoAWQ's
grid: int4 asymmetric (min/max of the group, integer zero point) or symmetric (-8..7).

All scales of a layer are searched on the float layer and applied together (AutoAWQ's order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from minicpm.loading.assemble import one_thread
from minicpm.quantization.linear import quantize_int8

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512
CLIP_ROWS = 1024        # output channels per step of the clip search (bounds its memory)
NO_CLIP = ("q_proj", "k_proj")


@dataclass
class ScalingGroup:
    """`prev` (RMSNorm or Linear) feeds `linears` (names within the layer); `inputs` names the
    Linear whose captured input they share; `inspect` is the module whose output the scale
    search compares (the linear itself when None)."""

    prev: str
    linears: list[str]
    inputs: str
    inspect: str | None = None


def scaling_groups(layer: nn.Module, model_type: str) -> list[ScalingGroup]:
    """AutoAWQ's groups: MiniCPM's definition (awq/models/minicpm.py) has no v -> o group;
    Llama's (awq/models/llama.py) has one when v_proj and o_proj have the same shape (not GQA)."""
    attn = layer.self_attn
    groups = [ScalingGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                           "self_attn.q_proj", "self_attn")]
    if model_type != "minicpm" and attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScalingGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
    groups.append(ScalingGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_proj", "mlp"))
    groups.append(ScalingGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"))
    return groups


# --- the grid -------------------------------------------------------------------------------------
def awq_codes(w: torch.Tensor, bits: int, group_size: int | None, sym: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [N, K], scales [N, groups], zeros [N, groups] or None) of w [N, K].
    int4 codes are 0..15 (symmetric: -8..7 stored as +8 with zero 8); int8 is our per-row
    symmetric form (-127..127, no zero)."""
    n, k = w.shape
    if bits == 8:
        q, scales = quantize_int8(w)
        return q.float(), scales[:, None], None
    g = w.reshape(n, k // group_size, group_size)
    if sym:
        scales = (g.abs().amax(dim=-1) / 7).clamp(min=1e-5)
        zeros = torch.full_like(scales, 8.0)
    else:
        hi, lo = g.amax(dim=-1), g.amin(dim=-1)
        scales = (hi - lo).clamp(min=1e-5) / 15
        zeros = torch.clamp(-torch.round(lo / scales), 0, 15)
    q = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, 15)
    return q.reshape(n, k), scales, zeros


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, sym: bool) -> torch.Tensor:
    """w rounded to the grid and back to floats."""
    return grid_values(*awq_codes(w, bits, group_size, sym))


def grid_values(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The floats that awq_codes' (codes, scales, zeros) stand for."""
    if zeros is None:
        return q * scales
    n, k = q.shape
    g = q.reshape(n, scales.shape[1], -1)
    return ((g - zeros[..., None]) * scales[..., None]).reshape(n, k)


# --- scale search ----------------------------------------------------------------------------------
def weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel mean of |w| normalised by its group's max (AutoAWQ's w_mean)."""
    w = torch.cat(weights, dim=0).float()
    g = w.shape[1] if group_size is None else group_size
    blocks = w.abs().reshape(-1, g)
    return (blocks / (blocks.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """Per channel mean of |x| over every token."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Linear], inspect: Callable[[torch.Tensor], torch.Tensor],
                 bits: int, group_size: int | None, sym: bool, chunk: int = 8) -> tuple[torch.Tensor, float]:
    """(best scales [K], its loss) for `linears` sharing input x [S, L, K]."""
    w_mean = weight_mean([m.weight for m in linears], group_size)
    x_mean = activation_mean(x)
    reference = _outputs(inspect, x, chunk)
    originals = [m.weight.detach().clone() for m in linears]
    best, best_loss = torch.ones_like(x_mean), float("inf")
    try:
        for step in range(N_GRID):
            ratio = step / N_GRID
            s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
            with one_thread():
                for m, w in zip(linears, originals):
                    m.weight.copy_(fake_quantize(w * s, bits, group_size, sym) / s)
            loss = _mse(reference, inspect, x, chunk)
            if loss < best_loss:
                best, best_loss = s.clone(), loss
    finally:
        for m, w in zip(linears, originals):
            m.weight.copy_(w)
    return best, best_loss


def _outputs(fn, x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    return [fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]


def _mse(reference: list[torch.Tensor], fn, x: torch.Tensor, chunk: int) -> float:
    total, count = 0.0, 0
    for ref, i in zip(reference, range(0, x.shape[0], chunk)):
        total += float((fn(x[i:i + chunk]) - ref).float().pow(2).sum())
        count += ref.numel()
    return total / count


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """prev's outputs / s, the linears' input columns * s: the same function, other weights.
    prev is an RMSNorm (its weight) or a Linear (the rows that feed the linears)."""
    s = scales.to(prev.weight.dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
    else:
        prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for m in linears:
        m.weight.mul_(scales.to(m.weight.dtype)[None, :])


# --- clip search -----------------------------------------------------------------------------------
@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, sym: bool
                ) -> torch.Tensor:
    """Per (row, group) clipping bound [N, groups] for w [N, K] with inputs x [..., K]."""
    with one_thread():
        return _search_clip(w, x, bits, group_size, sym)


def _search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, sym: bool) -> torch.Tensor:
    n, k = w.shape
    g = k if group_size is None else group_size
    x = x.reshape(-1, k)
    x = x[::max(1, x.shape[0] // CLIP_TOKENS)].float()
    xg = x.reshape(x.shape[0], k // g, g).transpose(0, 1)                 # [groups, T, G]
    bounds = []
    for r in range(0, n, CLIP_ROWS):
        wr = w[r:r + CLIP_ROWS].float()
        rows = wr.shape[0]
        # each group's partial outputs as one batched matmul: [groups, T, G] @ [groups, G, R]
        original = torch.bmm(xg, wr.reshape(rows, k // g, g).permute(1, 2, 0))
        top = wr.abs().reshape(rows, k // g, g).amax(dim=-1)               # [R, groups]
        best, best_err = top.clone(), torch.full_like(top, float("inf"))
        for step in range(int(MAX_SHRINK * N_GRID)):
            bound = top * (1 - step / N_GRID)
            b = bound.repeat_interleave(g, dim=1)
            quantized = fake_quantize(torch.clamp(wr, -b, b), bits, group_size, sym)
            out = torch.bmm(xg, quantized.reshape(rows, k // g, g).permute(1, 2, 0))
            err = (out - original).pow(2).mean(dim=1).t()                  # [R, groups]
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, bound, best)
        bounds.append(best)
    return torch.cat(bounds)


@torch.no_grad()
def apply_clip(linear: nn.Linear, bounds: torch.Tensor) -> None:
    n, k = linear.weight.shape
    groups = bounds.shape[1]
    w = linear.weight.reshape(n, groups, k // groups)
    b = bounds.to(w.dtype)[..., None]
    linear.weight.copy_(torch.clamp(w, -b, b).reshape(n, k))
