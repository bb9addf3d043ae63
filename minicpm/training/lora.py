"""LoRA adapters (and QLoRA: LoRA over an int4 base), saved in PEFT's layout, and merging.

A target Linear becomes `LoraLinear`: y = base(x) + B(A(dropout(x))) * alpha / r, with the base
frozen, A initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh
adapter leaves the model unchanged. The base may be a float Linear or a QuantizedLinear (QLoRA):
autograd reaches x through the quantized layer's dequantizing path.

Files, as PEFT writes them (so PEFT and vLLM load them):
  adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                              target_modules (short names such as q_proj), bias "none"
  adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  [r, in]
                              base_model.model.<module path>.lora_B.weight  [out, r]
Module paths are the Hugging Face ones (model.layers.0.self_attn.q_proj), which PEFT sees on a
transformers model too. For the llama-format export of a muP model (`convert --to llama`), whose
o_proj/down_proj weights carry the residual scale, write the adapter with `for_llama_export`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_file, write_text
from minicpm.quantization.linear import QuantizedLinear
from minicpm.training.lora_update import low_rank_update

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix before the model's own module path
ALL_LINEAR = "all-linear"  # PEFT's name for every Linear but the output head
# Linears whose output is added to the residual stream: the llama export folds the residual
# scale into them, so their B is scaled alike there.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "w2")


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: str | list[str] = ALL_LINEAR  # "all-linear" or short module names (q_proj, v_proj, ...)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise MiniCPMError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise MiniCPMError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update; names as PEFT's (base_layer, lora_A, lora_B)."""

    def __init__(self, base_layer: nn.Module, spec: LoraSpec):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        dtype = torch.float32  # adapters train in fp32 whatever the base holds
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scaling = spec.scaling
        self.disabled = False
        self.train(base_layer.training)  # the mode of the model it joins
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        # nn.Dropout only holds p (and its train/eval switch): low_rank_update draws the mask
        dropout = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        update = low_rank_update(x, self.lora_A.weight, self.lora_B.weight, dropout, self.scaling)
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, [out, in]: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain float Linear equal to this layer (an int4/int8 base is dequantized first)."""
        from minicpm.model import Linear

        base = self.base_layer
        weight = base.dequantize() if isinstance(base, QuantizedLinear) else base.weight
        dtype = weight.dtype
        out = Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device,
                     dtype=dtype)
        with torch.no_grad():
            out.weight.copy_((weight.float() + self.delta_weight()).to(dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()))
    return tensor.device


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear))


def target_names(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full module paths of the Linears to adapt, inside the decoder layers (never the head)."""
    found = [f"model.layers.{name}" for name, module in model.model.layers.named_modules()
             if _is_linear(module) and not isinstance(module, LoraLinear)
             and (targets == ALL_LINEAR or name.rsplit(".", 1)[-1] in targets)]
    if not found:
        known = sorted({name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules() if _is_linear(m)})
        raise MiniCPMError(f"no Linear matches LoRA targets {targets}; the model has: {', '.join(known)}")
    return found


def add_lora(model: nn.Module, spec: LoraSpec, seed: int | None = None) -> list[str]:
    """Freeze `model` and wrap each target Linear in a LoraLinear; returns the wrapped paths."""
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = target_names(model, spec.targets)
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, LoraLinear(getattr(parent, child), spec))
    model.lora_spec = spec
    return names


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return model.get_submodule(path), child


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the duration (DPO's reference model costs no second copy)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def adapter_state(model: nn.Module, for_llama_export: bool = False) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors (fp32, contiguous)."""
    residual = model.config.residual_scale if for_llama_export else 1.0
    state = {}
    for name, layer in lora_layers(model):
        b = layer.lora_B.weight.detach().float()
        if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS:
            b = b * residual
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    return state


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict[str, Any]:
    spec: LoraSpec = model.lora_spec
    short = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": short,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None,
                 for_llama_export: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (into `out_dir`, which may exist)."""
    return write_adapter(adapter_config(model, base_model), adapter_state(model, for_llama_export), out_dir)


def write_adapter(config: dict[str, Any], tensors: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """The two adapter files from a config and PEFT-named tensors (each file replaced atomically)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2))
    with atomic_file(out_dir / WEIGHTS_FILE) as tmp:
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    return out_dir


def read_adapter(adapter_dir: str | Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """The spec and tensors of a PEFT LoRA adapter directory, checked."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MiniCPMError(f"{adapter_dir} is not a LoRA adapter: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MiniCPMError(f"{config_path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise MiniCPMError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise MiniCPMError(f"{config_path}: {key} adapters are not supported")
    targets = config.get("target_modules") or ALL_LINEAR
    spec = LoraSpec(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=0.0,
                    targets=targets if isinstance(targets, (list, str)) else list(targets))
    tensors = load_file(str(weights_path))
    return spec, tensors


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Wrap `model`'s target Linears and fill them from a PEFT adapter; returns the wrapped paths."""
    spec, tensors = read_adapter(adapter_dir)
    wanted: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        body = key.removeprefix(PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        for part in ("lora_A", "lora_B"):
            if body.endswith(f".{part}.weight"):
                wanted.setdefault(body[:-len(f".{part}.weight")], {})[part] = tensor
                break
        else:
            raise MiniCPMError(f"{adapter_dir}: unexpected tensor {key} (only lora_A/lora_B weights are supported)")
    modules = dict(model.named_modules())
    for name, parts in wanted.items():
        base = modules.get(name)
        if base is None or not _is_linear(base):
            raise MiniCPMError(f"{adapter_dir}: the adapter targets {name}, which this model does not have "
                               "as a Linear (is it the adapter of another model?)")
        if set(parts) != {"lora_A", "lora_B"}:
            raise MiniCPMError(f"{adapter_dir}: {name} lacks lora_A or lora_B")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parts in sorted(wanted.items()):
        parent, child = _parent(model, name)
        layer = LoraLinear(getattr(parent, child), spec)
        expected = {"lora_A": (spec.r, layer.in_features), "lora_B": (layer.out_features, spec.r)}
        for part, tensor in parts.items():
            if tuple(tensor.shape) != expected[part]:
                raise MiniCPMError(f"{adapter_dir}: {name}.{part} has shape {list(tensor.shape)}, "
                                   f"the model and r={spec.r} imply {list(expected[part])}")
            getattr(layer, part).weight.data.copy_(tensor)
        setattr(parent, child, layer)
    model.lora_spec = spec
    return sorted(wanted)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight, in place (fp32 sums); returns how many."""
    count = 0
    for name, layer in list(lora_layers(model)):
        parent, child = _parent(model, name)
        setattr(parent, child, layer.merged())
        count += 1
    if count and getattr(model.config, "quantization", None):
        # a merged layer is a float Linear: what remains quantized is no longer the recorded plan
        model.config = model.config.replace(quantization=None)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return count


@dataclass
class MergeCheck:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def merge_adapter(base: str, adapter_dir: str, out: str, dtype: str | None = None, overwrite: bool = False,
                  log=print) -> Path:
    """Load `base` in fp32, apply the adapter, merge in fp32, check the merged logits against the
    unmerged ones on a probe sequence, and save a plain checkpoint to `out` (in `dtype`, default
    the base's stored dtype). A quantized base is dequantized: the output is a float model."""
    from minicpm.formats import load_checkpoint
    from minicpm.formats.hf import check_writable, save_pretrained

    out_path = Path(out)
    check_writable(out_path, overwrite)
    model, tokenizer = load_checkpoint(base, dtype="float32")
    stored = getattr(model.config, "torch_dtype", None) or "float32"
    if model.config.quantization:  # QLoRA's base: the adapter goes onto its dequantized weights
        from minicpm.quantization import dequantize_model

        dequantize_model(model)
    load_adapter(model, adapter_dir)
    model.eval()
    probe = _probe_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(probe)
        merge_lora(model)
        after = model(probe)
    check = MergeCheck(float((after - before).abs().max()), float(before.abs().max()),
                       tolerance=1e-4 * max(1.0, float(before.abs().max())))
    if not check.ok:
        raise MiniCPMError(f"merged logits differ from the adapter's by {check.max_abs_diff:.3g} "
                           f"(tolerance {check.tolerance:.3g}); nothing written")
    log(f"merged logits match the adapter's: max |diff| {check.max_abs_diff:.2e} over {probe.numel()} tokens")
    save_pretrained(model, tokenizer, out_path, dtype=dtype or stored, overwrite=overwrite)
    return out_path


def _probe_ids(vocab_size: int, length: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, length), generator=generator)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a tied weight counted once)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            seen[id(module)] = (module.in_features * module.out_features, False)
    trainable = sum(n for n, grad in seen.values() if grad)
    return trainable, sum(n for n, _ in seen.values())


__all__ = ["ALL_LINEAR", "LoraLinear", "LoraSpec", "add_lora", "adapter_config", "adapter_state",
           "adapters_disabled", "has_lora", "load_adapter", "merge_adapter", "merge_lora", "read_adapter",
           "save_adapter", "trainable_parameters"]
