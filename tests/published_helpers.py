"""Reference writers for the quantized checkpoints other tools publish (GPTQ, AutoAWQ GEMM,
bitsandbytes 4-bit), written for the tests from the published layouts and independent of
minicpm.formats.published: numpy loops in the shape of the reference packers (AutoGPTQ's
QuantLinear.pack, AutoAWQ's WQLinear_GEMM.from_linear, bitsandbytes' quantize_4bit), and the
reference dequantization formulas. See /docs/quantization.md for the layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


# ------------------------------------------------------------------------------------ GPTQ

def gptq_quantize(weight: torch.Tensor, bits: int, group: int, sym: bool, order: torch.Tensor | None = None):
    """GPTQ's quantizer (no error feedback), groups formed along `order` (act-order) or in column
    order. -> q [K, N] ints, zeros [groups, N] ints, scales fp16 [groups, N], g_idx [K]."""
    w = weight.t().double()                                  # [K, N], GPTQ's W^T
    k, n = w.shape
    maxq = 2**bits - 1
    order = torch.arange(k) if order is None else order
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // group
    groups = (k + group - 1) // group
    q = torch.empty(k, n, dtype=torch.int64)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    scales = torch.empty(groups, n, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        block = w[cols]
        lo, hi = block.min(0).values.clamp(max=0), block.max(0).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        s = ((hi - lo) / maxq).half()
        z = torch.full((n,), (maxq + 1) // 2) if sym else torch.round(-lo / s.double()).long()
        q[cols] = (torch.round(block / s.double()) + z).clamp(0, maxq).long()
        zeros[g], scales[g] = z, s
    return q, zeros, scales, g_idx


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, bits: int, v1: bool = True):
    """AutoGPTQ's packing loops: qweight along K, qzeros along N, lowest bits = lowest index;
    v1 stores zero - 1 (cast to uint32, as AutoGPTQ does)."""
    per = 32 // bits
    intweight = q.numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << (bits * j)
    z = (zeros - 1 if v1 else zeros).numpy().astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= z[:, col * per + j] << (bits * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> torch.Tensor:
    """AutoGPTQ's torch dequantization, in float32: [N, K] nn.Linear weight."""
    mask = 2**bits - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
    q = q.reshape(-1, qweight.shape[1])
    z = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask
    z = z.reshape(qzeros.shape[0], -1)
    if v1:
        z = (z + 1) & mask
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).t().contiguous()


# ------------------------------------------------------------------------------------- AWQ

def awq_quantize(weight: torch.Tensor, group: int):
    """AutoAWQ's zero-point quantizer: q [K, N], zeros [K/G, N], scales fp16 [K/G, N]."""
    n, k = weight.shape
    w = weight.double().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    s = ((hi - lo).clamp(min=1e-5) / 15).half()
    z = (-torch.round(lo / s.double())).clamp(0, 15).long()
    q = (torch.round(w / s.double()[..., None]) + z[..., None]).clamp(0, 15).long()
    return q.reshape(n, k).t().contiguous(), z.t().contiguous(), s.t().contiguous()


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """WQLinear_GEMM.from_linear's loop: 8 columns per int32, column order_map[i] in nibble i."""
    v = values.numpy().astype(np.uint32)
    out = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= v[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return torch.from_numpy(out.view(np.int32))


def awq_dequantize(qweight, qzeros, scales, group: int) -> torch.Tensor:
    """AutoAWQ's dequantize_gemm in float32: [N, K]."""
    reverse = [AWQ_ORDER.index(j) for j in range(8)]

    def unpack(x):
        v = (x.unsqueeze(2) >> torch.arange(0, 32, 4, dtype=torch.int32).view(1, 1, -1)) & 15
        v = v.reshape(x.shape[0], -1)
        return v[:, (torch.arange(v.shape[1]).view(-1, 8)[:, reverse]).reshape(-1)]

    q, z = unpack(qweight), unpack(qzeros).repeat_interleave(group, 0)
    return ((q - z).float() * scales.float().repeat_interleave(group, 0)).t().contiguous()


# ------------------------------------------------------------------------------ bitsandbytes

def nested_map() -> torch.Tensor:
    """A 256-entry signed table for the double-quantized absmax (the file carries it)."""
    return torch.linspace(-1, 1, 256)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, nested_blocksize: int = 256):
    """bitsandbytes' 4-bit NF4 with double quant, as save_pretrained stores Linear4bit."""
    flat = weight.float().reshape(-1)
    numel = flat.numel()
    blocks = (numel + blocksize - 1) // blocksize
    padded = torch.zeros(blocks * blocksize)
    padded[:numel] = flat
    absmax = padded.reshape(blocks, blocksize).abs().amax(1)
    table = torch.tensor(NF4)
    codes = (padded.reshape(blocks, blocksize) / absmax[:, None]).unsqueeze(-1).sub(table).abs().argmin(-1)
    codes = codes.reshape(-1)[:numel]
    if numel % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=codes.dtype)])
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)
    offset = absmax.mean()
    centred = absmax - offset
    nb = (blocks + nested_blocksize - 1) // nested_blocksize
    nested = torch.stack([centred[i * nested_blocksize:(i + 1) * nested_blocksize].abs().max() for i in range(nb)])
    scaled = centred / nested.repeat_interleave(nested_blocksize)[:blocks]
    absmax_codes = (scaled.unsqueeze(-1) - nested_map()).abs().argmin(-1).to(torch.uint8)
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": list(weight.shape),
             "nested_blocksize": nested_blocksize, "nested_dtype": "float32", "nested_offset": offset.item()}
    return {"weight": packed, "weight.absmax": absmax_codes, "weight.quant_map": table,
            "weight.nested_absmax": nested, "weight.nested_quant_map": nested_map(),
            "weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


def nf4_dequantize(parts: dict, shape) -> torch.Tensor:
    """bitsandbytes' default-backend dequantize_4bit, in float32."""
    state = json.loads(bytes(parts["weight.quant_state.bitsandbytes__nf4"].tolist()))
    absmax = parts["weight.nested_quant_map"][parts["weight.absmax"].long()]
    nb = state["nested_blocksize"]
    absmax = (absmax.reshape(-1) * parts["weight.nested_absmax"].repeat_interleave(nb)[:absmax.numel()])
    absmax = absmax + torch.tensor(state["nested_offset"], dtype=torch.float32)
    b = parts["weight"].reshape(-1)
    codes = torch.empty(b.numel() * 2, dtype=torch.long)
    codes[0::2], codes[1::2] = (b >> 4).long(), (b & 15).long()
    numel = int(np.prod(shape))
    values = parts["weight.quant_map"][codes][:numel]
    return (values * absmax.repeat_interleave(state["blocksize"])[:numel]).reshape(shape)


# ------------------------------------------------------------------------------ checkpoints

def decoder_linears(model) -> list[str]:
    return [n for n, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, torch.nn.Linear) and not n.endswith("mlp.gate")]


def write_checkpoint(directory: Path, model, layers: dict[str, dict], settings: dict | None,
                     quantize_config: dict | None = None, weights_name: str = "model.safetensors",
                     dtype=torch.float16) -> Path:
    """A checkpoint directory: the model's config (+ quantization_config), quantize_config.json,
    and its tensors with `layers` ({linear: {part: tensor}}) in place of those linears' weights."""
    directory.mkdir(parents=True)
    model.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save(directory / "config.json")
    if settings is not None:
        raw = json.loads((directory / "config.json").read_text())
        raw["quantization_config"] = settings
        (directory / "config.json").write_text(json.dumps(raw))
    if quantize_config is not None:
        (directory / "quantize_config.json").write_text(json.dumps(quantize_config))
    state = {k: v.to(dtype) for k, v in model.state_dict().items()
             if k.rpartition(".")[0] not in layers and not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    for name, parts in layers.items():
        state.update({f"{name}.{leaf}": t.contiguous() for leaf, t in parts.items()})
    save_file(state, str(directory / weights_name))
    return directory
