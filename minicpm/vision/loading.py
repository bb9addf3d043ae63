"""Assemble a MiniCPMV from checkpoint tensors named as released (`llm.*`, `vpm.*`, `resampler.*`).

The `llm.*` tensors stream into the decoder's own assembler (minicpm.loading.assemble, or
minicpm.quantization's for a quantized checkpoint), which checks every name and shape; the vision
tensors (a tenth of the model) are set aside as they arrive, still memory-mapped, and loaded once
the stream has ended, with the same checks.

A quantized checkpoint (`minicpm quantize`) records in config.json's `quantization` how its
vision tower is stored: `"vision": "bf16"` as released, or `"int8"`: the Linears of every
vision block (`vision_linears`) as int8 codes + per-row scales, like the decoder's int8 layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from minicpm.errors import CheckpointError
from minicpm.loading.assemble import build_model, config_dtype, resolve_device, resolve_dtype
from minicpm.quantization.linear import QuantizedLinear
from minicpm.quantization.quantize import load_quantized
from minicpm.vision.config import MiniCPMVConfig
from minicpm.vision.model import MiniCPMV

VISION_PREFIXES = ("vpm.", "resampler.")


VISION_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def build_minicpmv(config: MiniCPMVConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
                   dtype: Any = None, device: Any = None, source: str = "checkpoint") -> MiniCPMV:
    """A MiniCPMV in eval mode. dtype None keeps config.json's torch_dtype (bf16 as released)."""
    vision: dict[str, torch.Tensor] = {}
    llm_tensors = _llm_tensors(named_tensors, vision, source)
    if config.llm.quantization:
        llm = load_quantized(config.llm, llm_tensors, dtype=dtype, device=device, source=source)
    else:
        llm = build_model(config.llm, llm_tensors, dtype=dtype, device=device, source=source)
    target = resolve_dtype(dtype) or config_dtype(config.llm)
    with torch.device("meta"):
        model = MiniCPMV(config, llm=_Placeholder())  # the vision parts only, for now
    _load_vision(model, vision, target, resolve_device(device), source, quantized_vision_linears(config))
    model.llm = llm
    return model.eval().requires_grad_(False)


def vision_linears(config: MiniCPMVConfig) -> list[str]:
    """The Linears `--vision int8` quantizes: those of every vision block, 99% of the tower's
    weights. The resampler (7% of the vision weights) and the patch embedding stay as stored."""
    return [f"vpm.blocks.{i}.{leaf}" for i in range(config.vision_layers) for leaf in VISION_BLOCK_LINEARS]


def quantized_vision_linears(config: MiniCPMVConfig) -> list[str]:
    """The vision Linears a checkpoint stores quantized (none unless its record says int8)."""
    record = config.llm.quantization or {}
    return vision_linears(config) if record.get("vision") == "int8" else []


class _Placeholder(nn.Module):
    """Stands for the decoder (no parameters) while the vision parts are loaded."""


def _llm_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], vision: dict[str, torch.Tensor],
                 source: str) -> Iterator[tuple[str, torch.Tensor]]:
    unexpected = []
    for name, tensor in named_tensors:
        if name.startswith("llm."):
            yield name.removeprefix("llm."), tensor
        elif name.startswith(VISION_PREFIXES):
            vision[name] = tensor
        else:
            unexpected.append(name)
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s): {shown}")


def _load_vision(parts: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
                 device: torch.device, source: str, quantized: list[str] = ()) -> None:
    expected = {n: t for n, t in parts.state_dict().items() if n.rpartition(".")[0] not in quantized}
    for module in quantized:  # int8 codes + per-row scales (+ the bias) instead of the weight
        weight = parts.get_submodule(module).weight
        expected[f"{module}.qweight"] = torch.empty(weight.shape, dtype=torch.int8, device="meta")
        expected[f"{module}.scales"] = torch.empty(weight.shape[0], device="meta")
        expected[f"{module}.bias"] = torch.empty(weight.shape[0], device="meta")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise CheckpointError(f"{source}: {len(names)} {label} vision tensor(s): {shown}")
    state = {}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {list(tensor.shape)}, "
                                  f"config.json implies {list(expected[name].shape)}")
        if name.endswith(".qweight"):
            if tensor.dtype != torch.int8:
                raise CheckpointError(f"{source}: tensor {name} has dtype {tensor.dtype}, expected int8")
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has non-float dtype {tensor.dtype}")
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    layers = {module: [state.pop(f"{module}.{leaf}") for leaf in ("scales", "bias")] for module in quantized}
    parts.load_state_dict(state, assign=True, strict=not quantized)  # names checked above either way
    for module, (scales, bias) in layers.items():
        layer = QuantizedLinear.from_quantized(tensors[f"{module}.qweight"].to(device), scales, None, 8, None,
                                               bias, dtype=bias.dtype)
        parent, _, attr = module.rpartition(".")
        setattr(parts.get_submodule(parent), attr, layer)


def random_minicpmv(config: MiniCPMVConfig, seed: int = 0, dtype: Any = torch.float32,
                    std: float = 0.3, vision_std: float = 0.05) -> MiniCPMV:
    """A seeded random MiniCPMV (tests, benchmarks): N(0, std) weights, norms near 1, the
    query position table the sin-cos one, as the official initialisation makes it."""
    from minicpm.vision.resampler import sincos_table

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MiniCPMV(config).state_dict().items()}
    grid = round(config.query_num ** 0.5)

    def tensors():
        for name, shape in shapes.items():
            if name == "resampler.pos_embed":
                yield name, sincos_table(config.llm.hidden_size, grid, grid).clone()
            elif _is_norm_weight(name):
                yield name, 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                scale = vision_std if name.startswith(VISION_PREFIXES) else std
                yield name, scale * torch.randn(shape, generator=gen)

    return build_minicpmv(config, tensors(), dtype=dtype, device="cpu", source="random")


def _is_norm_weight(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    last = module.rpartition(".")[2]
    return attr == "weight" and ("norm" in last or last.startswith("ln_"))
