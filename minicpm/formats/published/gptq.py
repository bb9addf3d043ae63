"""GPTQ layers (AutoGPTQ v1 and GPTQModel v2): read into our layers, and written from them.

Per quantized nn.Linear `X` of weight [out, in], at `bits` (4 or 8) and group G:
    X.qweight  int32 [in*bits/32, out]    codes packed along the input dimension
    X.qzeros   int32 [groups, out*bits/32] zero points packed along the output dimension
    X.scales   fp16  [groups, out]
    X.g_idx    int32 [in]                 the group of every input column (act-order: scattered)
    X.bias     [out], optional (AutoGPTQ <= 0.7.1 wrote an all-zero one for bias-free layers)
    w[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])
v1 ("gptq") stores z - 1 in each field and readers add 1 back per field, modulo 2^bits;
v2 ("gptq_v2", GPTQModel) stores z. A zero point of 0 is stored in v1 as the field 2^bits - 1,
which AutoGPTQ's readers turn back into 0 (GPTQModel's word-wise v1 -> v2 conversion carries it
into the next field; its own note says so).
"""

from __future__ import annotations

import torch

from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.formats.published.layers import codes_back, repacked_layer
from minicpm.formats.published.packing import pack_words, unpack_words
from minicpm.formats.published.settings import Published
from minicpm.quantization.linear import QuantizedLinear

PARTS = ("qweight", "qzeros", "scales", "g_idx")


def check_shape(source: str, name: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{source}: {name} has shape {list(tensor.shape)}, expected {list(shape)} {what}")


def require_parts(source: str, module: str, parts: dict, names: tuple, method: str) -> None:
    for leaf in names:
        if leaf not in parts:
            raise CheckpointError(f"{source}: {module}.{leaf} is missing ({method} layers store "
                                  f"{', '.join(names)})")


def require_int32(source: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise CheckpointError(f"{source}: {name} has dtype {tensor.dtype}, expected int32 (packed codes)")


def gptq_layer(module: str, parts: dict, published: Published, out_features: int, in_features: int,
               bias: torch.Tensor | None, dtype: torch.dtype, source: str):
    """One GPTQ layer -> (QuantizedLinear, None) or (float weight, why); see layers.repacked_layer."""
    require_parts(source, module, parts, PARTS, "GPTQ")
    bits = published.bits
    per = 32 // bits
    what = f"for a {out_features}x{in_features} linear at {bits} bits"
    if in_features % per or out_features % per:
        raise CheckpointError(f"{source}: {module} is {out_features}x{in_features}, which {bits}-bit GPTQ "
                              f"cannot pack ({per} values per int32)")
    qweight, qzeros, scales, g_idx = (parts[p] for p in PARTS)
    for leaf in ("qweight", "qzeros"):
        require_int32(source, f"{module}.{leaf}", parts[leaf])
    check_shape(source, f"{module}.qweight", qweight, (in_features // per, out_features), what)
    groups = scales.shape[0] if scales.dim() == 2 else 0
    check_shape(source, f"{module}.scales", scales, (max(groups, 1), out_features), what)
    check_shape(source, f"{module}.qzeros", qzeros, (groups, out_features // per), what)
    check_shape(source, f"{module}.g_idx", g_idx, (in_features,), what)
    if not scales.is_floating_point() or g_idx.is_floating_point():
        raise CheckpointError(f"{source}: {module}: scales must be floats and g_idx integers")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise CheckpointError(f"{source}: {module}.g_idx names groups outside 0..{groups - 1}")
    codes = unpack_words(qweight, bits, dim=0).t()                       # [out, in]
    zeros = unpack_words(qzeros, bits, dim=1)
    if published.zero_offset:
        zeros = (zeros + published.zero_offset) & ((1 << bits) - 1)
    return repacked_layer(codes, zeros.t(), scales.t().contiguous(), g_idx, bits, bias, dtype)


# ------------------------------------------------------------------------------------------ writing

def rtn_codes(weight: torch.Tensor, bits: int, group: int, sym: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer without calibration: per group of `group` columns, a grid that includes 0
    (asym: zero = round(-min/scale); sym: zero = 2^(bits-1)), scales rounded to fp16 before the
    codes are taken. -> codes [N, K], zeros [N, ceil(K/group)] (int32), scales [N, ceil(K/group)] fp16."""
    n, k = weight.shape
    maxq = (1 << bits) - 1
    groups = -(-k // group)  # a shorter last group when group does not divide k, as GPTQ does;
    # zero columns pad it without changing it: the grid includes 0 anyway
    w = torch.nn.functional.pad(weight.float(), (0, groups * group - k)).reshape(n, groups, group)
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scales = ((hi - lo) / maxq).half()
    if sym:
        zeros = torch.full_like(lo, (maxq + 1) // 2)
    else:
        zeros = torch.round(-lo / scales.float()).clamp(0, maxq)
    q = torch.round(w / scales.float()[..., None]) + zeros[..., None]
    return q.clamp(0, maxq).to(torch.int32).reshape(n, -1)[:, :k], zeros.to(torch.int32), scales


def layer_codes(layer: QuantizedLinear, name: str):
    """A quantized layer's (bits, codes [N, K] in x's column order, zeros [N, groups], scales
    [N, groups], g_idx [K]) in GPTQ's terms, exactly; MiniCPMError when it has no GPTQ form."""
    q = layer.codes()
    scales, term = layer.scales_zeros()
    n, k = layer.out_features, layer.in_features
    if layer.bits == 8:
        codes, scales = q.to(torch.int32) + 128, scales.reshape(n, -1)
        zeros = torch.full(scales.shape, 128, dtype=torch.int32)
    else:
        codes = q.to(torch.int32)
        if layer.has_offsets:  # w = q*s + m is (q - z)*s where m = -z*s for an integer z
            z = -term.float() / scales.float()
            if not torch.equal(z * scales.float(), -term.float()):
                raise MiniCPMError(f"{name}: its offsets are not integer zero points (e.g. GGUF Q4_1/Q4_K), "
                                   "which GPTQ cannot store exactly")
            term = z
        zeros = term.float()
        if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 15:
            raise MiniCPMError(f"{name}: its zero points are not integers in 0..15 (round-to-nearest with "
                               "float zero points), which GPTQ cannot store exactly")
        zeros = zeros.to(torch.int32)
    group = k // scales.shape[1]
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if layer.input_perm is not None:  # stored column j is x's column perm[j]
        perm = layer.input_perm
        codes = codes_back(codes, perm)
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k, dtype=torch.int32) // group
    return layer.bits, codes, zeros, scales, g_idx


def gptq_tensors(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (v1 with zero_offset 1: zero points stored minus one, a
    zero point 0 as the field 2^bits - 1)."""
    mask = (1 << bits) - 1
    return {
        "qweight": pack_words(codes.t(), bits, dim=0),
        "qzeros": pack_words(((zeros - zero_offset) & mask).t(), bits, dim=1),
        "scales": scales.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
