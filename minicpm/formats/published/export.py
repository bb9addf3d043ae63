"""`minicpm convert SRC OUT --to gptq`: a GPTQ v1 checkpoint (AutoGPTQ's layout), which
transformers/optimum, GPTQModel and vLLM load.

The decoder's linears (not the MoE router) are written as GPTQ layers:
  - a layer already quantized with integer zero points (a GPTQ/AWQ checkpoint we loaded, GGUF
    Q4_0, our int8) keeps its codes, zero points and act-order exactly; scales are stored fp16
    (a warning says if that rounds them);
  - a float layer is quantized the GPTQ way without calibration (`gptq.rtn_codes`);
  - a quantized layer with no integer zero points (our float-zero-point int4, GGUF Q4_1/Q4_K)
    is refused: convert the float checkpoint instead, or pass --dtype to requantize its
    dequantized weights.
Everything else (embedding, norms, head) is written as floats (fp16 unless --dtype says).
Files: config.json with `quantization_config`, quantize_config.json, model.safetensors (or
shards + index), generation_config.json and the tokenizer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_dir
from minicpm.formats.hf import (
    ShardWriter,
    check_writable,
    checkpoint_state_dict,
    write_checkpoint_files,
)
from minicpm.formats.published.gptq import gptq_tensors, layer_codes, rtn_codes
from minicpm.quantization import QuantizedLinear, dequantize_model

DEFAULT_GROUP = 128


def gptq_targets(model: nn.Module) -> list[str]:
    """The decoder linears a GPTQ checkpoint quantizes (what AutoGPTQ's llama/minicpm classes do)."""
    return [name for name, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, (nn.Linear, QuantizedLinear)) and not name.endswith("mlp.gate")]


def write_gptq(model: nn.Module, tokenizer, out: Path, bits: int | None = None, group_size: int | None = None,
               sym: bool | None = None, dtype: torch.dtype = torch.float16, overwrite: bool = False,
               max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as a GPTQ v1 checkpoint directory (the model's quantized layers are used up)."""
    check_writable(Path(out), overwrite)
    targets = gptq_targets(model)
    quantized = any(isinstance(model.get_submodule(n), QuantizedLinear) for n in targets)
    if quantized and (bits, group_size, sym) != (None, None, None):
        raise MiniCPMError("the model is already quantized: --bits/--group-size/--sym choose how float "
                           "weights are quantized; convert the float checkpoint to choose them")
    bits = 4 if bits is None else bits
    group_size, sym = DEFAULT_GROUP if group_size is None else group_size, bool(sym)
    if bits not in (4, 8):
        raise MiniCPMError(f"GPTQ export writes 4 or 8 bits, got {bits}")
    layers = {name: _layer_tensors(model.get_submodule(name), name, bits, group_size, sym) for name in targets}
    settings = _settings(layers, targets)
    for name in targets:  # their tensors are in `layers`; the rest of the model becomes floats
        _swap(model, name, nn.Identity())
    dequantize_model(model)
    floats = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint_state_dict(model).items()}
    config = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."), quantization=None,
                                  extra={**model.config.extra, "quantization_config": settings})
    with atomic_dir(out) as tmp:
        write_checkpoint_files(config, tokenizer, tmp)
        (tmp / "quantize_config.json").write_text(json.dumps(settings, indent=2) + "\n")
        writer = ShardWriter(tmp, max_shard_bytes)
        try:
            for name, tensor in floats.items():
                writer.add(name, tensor)
            for name, parts in layers.items():
                for leaf, tensor in parts.items():
                    writer.add(f"{name}.{leaf}", tensor.to(dtype) if leaf == "bias" else tensor)
            writer.close()
        finally:
            writer.abort()
    return out


def _layer_tensors(module: nn.Module, name: str, bits: int, group: int, sym: bool) -> dict[str, torch.Tensor]:
    """One layer's GPTQ tensors (+ "bias"), with its (bits, group, sym, act-order) under "_meta"."""
    if isinstance(module, QuantizedLinear):
        bits, codes, zeros, scales, g_idx = layer_codes(module, name)
        layer_group = module.in_features // scales.shape[1]
        fp16 = scales.to(torch.float16).float()
        if not torch.equal(fp16, scales.float()):
            change = ((fp16 - scales.float()).abs() / scales.float().abs().clamp(min=1e-30)).max()
            warnings.warn(f"{name}: scales rounded to float16 for GPTQ (relative change up to {change:.1e})",
                          stacklevel=3)
    else:
        weight = module.weight.detach()
        k = weight.shape[1]
        layer_group = k if group == -1 else group
        if layer_group <= 0:
            raise MiniCPMError(f"group size must be positive or -1, got {group}")
        codes, zeros, scales = rtn_codes(weight, bits, layer_group, sym)
        g_idx = torch.arange(k, dtype=torch.int32) // layer_group
    parts = gptq_tensors(codes, zeros, scales, g_idx, bits)
    if module.bias is not None:
        parts["bias"] = module.bias.detach()
    groups = scales.shape[1]
    parts["_meta"] = {"bits": bits, "group": layer_group, "groups": groups,
                      "sym": bool((zeros == 1 << (bits - 1)).all()),
                      "act_order": not torch.equal(g_idx, torch.sort(g_idx).values),
                      "zero_0": bool((zeros == 0).any())}
    return parts


def _settings(layers: dict[str, dict], targets: list[str]) -> dict:
    """quantize_config.json (also config.json's quantization_config): one bits and group size
    for every layer, as GPTQ checkpoints have (-1: one group per row)."""
    metas = [layers[name].pop("_meta") for name in targets]
    bits = {m["bits"] for m in metas}
    groups = {m["group"] for m in metas}
    if len(groups) > 1 and all(m["groups"] == 1 for m in metas):
        groups = {-1}
    if len(bits) > 1 or len(groups) > 1:
        raise MiniCPMError(f"the model's layers mix bits/group sizes ({sorted(bits)}, {sorted(groups)}); a GPTQ "
                           "checkpoint stores one of each: convert the float checkpoint instead")
    sym = all(m["sym"] for m in metas)
    if not sym and any(m["zero_0"] for m in metas):
        warnings.warn("some groups have zero point 0, which GPTQ v1 stores as the field 2^bits - 1: AutoGPTQ, "
                      "transformers and vLLM read it back as 0, GPTQModel's v1 -> v2 conversion does not",
                      stacklevel=3)
    return {"bits": bits.pop(), "group_size": groups.pop(), "damp_percent": 0.01,
            "desc_act": any(m["act_order"] for m in metas), "static_groups": False, "sym": sym,
            "true_sequential": True, "quant_method": "gptq", "checkpoint_format": "gptq",
            "model_name_or_path": None, "model_file_base_name": "model"}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
