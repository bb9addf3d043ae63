"""bitsandbytes 4-bit (NF4/FP4, optionally double-quantized) weights -> float weights.

Per quantized nn.Linear `X` (bitsandbytes' Linear4bit state dict, as save_pretrained writes it):
    X.weight                         uint8 [numel/2, 1]: the row-major weight in blocks of
                                     `blocksize`; each byte holds element 2i in its high nibble
    X.weight.absmax                  one scale per block (uint8 codes when double-quantized)
    X.weight.quant_map               the 16 code values (NF4's normal-float table, or FP4's)
    X.weight.nested_absmax / nested_quant_map   double quant: absmax = nested_quant_map[code]
                                     * nested_absmax[block of nested_blocksize] + nested_offset
    X.weight.quant_state.bitsandbytes__nf4      uint8 bytes of a JSON object: quant_type,
                                     blocksize, dtype, shape (+ nested_blocksize, nested_offset)
    w = quant_map[code] * absmax[block], computed in float32 as bitsandbytes does.

The 16 levels are not evenly spaced, so no zero-point or offset form of our int4 kernel holds
them: these weights are dequantized, and the loader says so with the memory it costs.
"""

from __future__ import annotations

import json
import math

import torch

from minicpm.errors import CheckpointError

STATE_KEYS = ("weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
PARTS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
         *STATE_KEYS)


def quant_state(module: str, parts: dict, source: str) -> dict:
    """The JSON of a layer's packed quant state, checked for the keys dequantizing needs."""
    raw = next(parts[k] for k in STATE_KEYS if k in parts)
    try:
        state = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
        state["blocksize"], state["shape"] = int(state["blocksize"]), [int(d) for d in state["shape"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: {module}.weight.quant_state is not a bitsandbytes quant state: {e}") from None
    return state


def nf4_weight(module: str, parts: dict, shape: tuple[int, int], source: str) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's weight, dequantized: float32 [out, in]."""
    for leaf in ("weight", "weight.absmax", "weight.quant_map"):
        if leaf not in parts:
            raise CheckpointError(f"{source}: {module}.{leaf} is missing (bitsandbytes 4-bit layers store "
                                  "weight, weight.absmax, weight.quant_map and the quant_state)")
    state = quant_state(module, parts, source)
    if tuple(state["shape"]) != tuple(shape):
        raise CheckpointError(f"{source}: {module}.weight has shape {state['shape']} in its quant state, "
                              f"config.json implies {list(shape)}")
    numel, block = math.prod(shape), state["blocksize"]
    packed = parts["weight"].reshape(-1).view(torch.uint8)
    blocks = -(-numel // block)
    absmax = _absmax(module, parts, state, blocks, source)
    code_values = parts["weight.quant_map"].float().reshape(-1)
    if packed.numel() != -(-numel // 2) or code_values.numel() != 16:
        raise CheckpointError(f"{source}: {module}.weight holds {packed.numel()} bytes and {code_values.numel()} "
                              f"code values; {list(shape)} needs {-(-numel // 2)} and 16")
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:numel].long()
    values = code_values[codes]
    return (values * absmax.repeat_interleave(block)[:numel]).reshape(shape)


def _absmax(module: str, parts: dict, state: dict, blocks: int, source: str) -> torch.Tensor:
    """One float32 scale per block; double quant decoded as bitsandbytes decodes it."""
    absmax = parts["weight.absmax"].reshape(-1)
    if absmax.numel() != blocks:
        raise CheckpointError(f"{source}: {module}.weight.absmax has {absmax.numel()} values, expected {blocks}")
    if "weight.nested_absmax" not in parts:
        return absmax.float()
    if "weight.nested_quant_map" not in parts or "nested_blocksize" not in state:
        raise CheckpointError(f"{source}: {module}: double-quantized absmax without nested_quant_map/nested_blocksize")
    nested_block = int(state["nested_blocksize"])
    nested = parts["weight.nested_absmax"].float().reshape(-1)
    if nested.numel() != -(-blocks // nested_block):
        raise CheckpointError(f"{source}: {module}.weight.nested_absmax has {nested.numel()} values, "
                              f"expected {-(-blocks // nested_block)}")
    table = parts["weight.nested_quant_map"].float().reshape(-1)
    scaled = table[absmax.long()] * nested.repeat_interleave(nested_block)[:blocks]
    return scaled + torch.tensor(float(state.get("nested_offset", 0.0)), dtype=torch.float32)
