"""Loading a published quantized checkpoint directory into our model, one tensor at a time.

Every tensor name is known from the file headers before anything is read, so each quantized
layer is converted as soon as its last part arrives (peak memory: the model plus one layer).
GPTQ/AWQ layers become QuantizedLinear layers holding the stored values exactly (repacked for
our int4/int8 kernels); what no kernel form holds (bitsandbytes' NF4, 8-bit asym GPTQ, ...) is
dequantized exactly into a float weight, with one warning that names it and its memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError
from minicpm.formats.hf import iter_tensors, tensor_names, weight_files
from minicpm.formats.published import bnb
from minicpm.formats.published.awq import awq_layer
from minicpm.formats.published.gptq import gptq_layer
from minicpm.formats.published.settings import Published
from minicpm.loading.assemble import (
    build_model,
    config_dtype,
    one_thread,
    release_freed_memory,
    resolve_dtype,
)
from minicpm.model import MiniCPMForCausalLM
from minicpm.quantization.linear import QuantizedLinear, share_equal_permutations

# the tensors of one quantized layer, by method; "bias" travels with GPTQ/AWQ layers
LAYER_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx", "bias"),
               "awq": ("qweight", "qzeros", "scales", "bias"),
               "bitsandbytes": bnb.PARTS}
MARKERS = {"gptq": ("qweight",), "awq": ("qweight",), "bitsandbytes": bnb.STATE_KEYS}


def load_published(directory: Path, config: MiniCPMConfig, published: Published, dtype: Any = None,
                   device: Any = None) -> nn.Module:
    """The model of a GPTQ, AWQ or bitsandbytes 4-bit checkpoint directory."""
    source = str(directory)
    files = weight_files(directory)
    names = tensor_names(files)
    config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
    with torch.device("meta"):
        meta = MiniCPMForCausalLM(config)
    linears = {name: m for name, m in meta.named_modules() if isinstance(m, nn.Linear)}
    layers = _layer_parts(names, published.method)
    strays = sorted(set(layers) - set(linears))
    if strays:
        raise CheckpointError(f"{source}: quantized tensors for {strays[0]}, which is not a linear layer of this "
                              "model" + (f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""))
    layer_dtype = resolve_dtype(dtype) or config_dtype(config) or torch.float32
    reader = _Reader(published, linears, layer_dtype, source)
    stream = iter_tensors(files, copy=lambda name: _split(name, layers, published.method) is not None)
    with one_thread():
        model = build_model(config, reader.convert(stream, layers), dtype=dtype, device=device, source=source)
    reader.report()
    if reader.repacked:
        head = reader.repacked.get("lm_head")  # GPTQModel's lm_head: true
        record: dict[str, Any] = {"method": published.method, "layers": reader.repacked,
                                  "head": f"int{head[0]}" if head else "bf16", "embedding": "float"}
        if reader.permuted:
            record["input_perm"] = sorted(reader.permuted)
            share_equal_permutations(model)
        model.config = model.config.replace(quantization=record)
    release_freed_memory()
    return model


def _layer_parts(names: list[str], method: str) -> dict[str, set[str]]:
    """{layer: the names of its parts in the files} for every quantized layer."""
    layers: dict[str, set[str]] = {}
    for name in names:
        for marker in MARKERS[method]:
            if name.endswith("." + marker):
                layers[name[:-len(marker) - 1]] = set()
    for name in names:
        split = _split(name, layers, method)
        if split is not None:
            layers[split[0]].add(split[1])
    return layers


def _split(name: str, layers: dict, method: str) -> tuple[str, str] | None:
    """(layer, part) when `name` is a part of a quantized layer."""
    for part in LAYER_PARTS[method]:
        if name.endswith("." + part) and name[:-len(part) - 1] in layers:
            return name[:-len(part) - 1], part
    return None


class _Reader:
    """Converts the layers as their parts arrive; keeps what the model's record needs."""

    def __init__(self, published: Published, linears: dict[str, nn.Linear], dtype: torch.dtype, source: str):
        self.published, self.linears, self.dtype, self.source = published, linears, dtype, source
        self.repacked: dict[str, list] = {}        # layer: [bits, group]
        self.permuted: set[str] = set()
        self.dequantized: dict[str, int] = {}      # why: float bytes

    def convert(self, stream, layers: dict[str, set[str]]):
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in stream:
            split = _split(name, layers, self.published.method)
            if split is None:
                yield name, tensor
                continue
            layer, part = split
            parts = pending.setdefault(layer, {})
            parts[part] = tensor
            if parts.keys() == layers[layer]:
                yield from self._layer(layer, pending.pop(layer))
                release_freed_memory()

    def _layer(self, name: str, parts: dict[str, torch.Tensor]):
        linear = self.linears[name]
        out_features, in_features = linear.weight.shape
        bias = self._bias(name, parts.get("bias"), linear)
        if self.published.method == "bitsandbytes":
            weight = bnb.nf4_weight(name, parts, (out_features, in_features), self.source)
            self._note(f"bitsandbytes {self.published.checkpoint_format}", weight)
            yield f"{name}.weight", weight
            return
        build = gptq_layer if self.published.method == "gptq" else awq_layer
        layer, why = build(name, parts, self.published, out_features, in_features, bias, self.dtype, self.source)
        if why is not None:
            self._note(why, layer)
            yield f"{name}.weight", layer
            if bias is not None:
                yield f"{name}.bias", bias
            return
        self.repacked[name] = [layer.bits, layer.group_size]
        if isinstance(layer, QuantizedLinear) and layer.input_perm is not None:
            self.permuted.add(name)
        yield f"{name}.weight", layer

    def _bias(self, name: str, bias: torch.Tensor | None, linear: nn.Linear) -> torch.Tensor | None:
        """The layer's bias; an all-zero one on a layer without bias (AutoGPTQ <= 0.7.1) is dropped."""
        if linear.bias is None:
            if bias is not None and bool(bias.count_nonzero()):
                raise CheckpointError(f"{self.source}: {name}.bias is not zero, but config.json gives the layer no bias")
            return None
        if bias is None:
            raise CheckpointError(f"{self.source}: {name}.bias is missing")
        return bias.to(self.dtype)

    def _note(self, why: str, weight: torch.Tensor) -> None:
        self.dequantized[why] = self.dequantized.get(why, 0) + weight.numel() * self.dtype.itemsize

    def report(self) -> None:
        """One warning for everything dequantized: which layers, why, and the memory it costs."""
        if not self.dequantized:
            return
        method = self.published.method
        reasons = "; ".join(self.dequantized)
        total = sum(self.dequantized.values()) / 1e6
        hint = ("NF4's 16 uneven levels have no integer form our kernels run" if method == "bitsandbytes"
                else "no form of our int4/int8 kernels holds them")
        warnings.warn(f"{self.source}: {method} layers dequantized to {str(self.dtype).removeprefix('torch.')} "
                      f"({reasons}: {total:.1f} MB): {hint}; `minicpm quantize` makes an int4 copy", stacklevel=3)
