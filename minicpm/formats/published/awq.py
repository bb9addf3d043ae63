"""AutoAWQ GEMM layers -> our int4 layers.

Per quantized nn.Linear `X` of weight [out, in], group G:
    X.qweight  int32 [in, out/8]      codes packed along the output dimension, interleaved
    X.qzeros   int32 [in/G, out/8]    zero points, packed the same way (stored as they are)
    X.scales   fp16  [in/G, out]
    X.bias     [out], if the linear has one
    w[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]
"""

from __future__ import annotations

import torch

from minicpm.errors import CheckpointError
from minicpm.formats.published.gptq import check_shape, require_int32, require_parts
from minicpm.formats.published.layers import repacked_layer
from minicpm.formats.published.packing import awq_unpack
from minicpm.formats.published.settings import Published

PARTS = ("qweight", "qzeros", "scales")


def awq_layer(module: str, parts: dict, published: Published, out_features: int, in_features: int,
              bias: torch.Tensor | None, dtype: torch.dtype, source: str):
    """One AWQ GEMM layer -> (QuantizedLinear, None) or (float weight, why)."""
    require_parts(source, module, parts, PARTS, "AWQ")
    if out_features % 8:
        raise CheckpointError(f"{source}: {module} has {out_features} outputs, which AWQ GEMM cannot pack (8 per int32)")
    group = published.group_size
    if in_features % group:
        raise CheckpointError(f"{source}: {module} has {in_features} inputs, not a multiple of the group {group}")
    what = f"for a {out_features}x{in_features} linear at 4 bits, group {group}"
    for leaf in ("qweight", "qzeros"):
        require_int32(source, f"{module}.{leaf}", parts[leaf])
    check_shape(source, f"{module}.qweight", parts["qweight"], (in_features, out_features // 8), what)
    check_shape(source, f"{module}.qzeros", parts["qzeros"], (in_features // group, out_features // 8), what)
    check_shape(source, f"{module}.scales", parts["scales"], (in_features // group, out_features), what)
    if not parts["scales"].is_floating_point():
        raise CheckpointError(f"{source}: {module}.scales must be floats")
    codes = awq_unpack(parts["qweight"]).t()                  # [out, in]
    zeros = awq_unpack(parts["qzeros"]).t()                   # [out, in/G]
    groups_of_k = torch.arange(in_features) // group
    return repacked_layer(codes, zeros, parts["scales"].t().contiguous(), groups_of_k, 4, bias, dtype)
