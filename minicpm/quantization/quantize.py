"""Swap a model's Linears for quantized ones, save the result, and rebuild it at load time.

Which layers are quantized is a predicate over (name, module); by default every Linear of the
decoder except the MoE router (a few outputs that decide everything downstream). The head is its
own choice: int8 by default; int4 in groups of HEAD_INT4_GROUP (MiniCPM-2B's head: 283 -> 177 MB,
for the tightest memory); or kept as it is (`head="bf16"`, i.e. in the model's own dtype).

A tied embedding with a quantized head reads its lookups from the head's table
(`embedding="head"`, the default; QuantizedEmbedding): the float table is then neither kept in
memory nor stored, 566 MB of bf16 for MiniCPM-2B. `embedding="float"` keeps the float table for
the lookups beside the head's int8 copy (what checkpoints without the "embedding" key hold).
An untied embedding is never quantized: a lookup reads a few rows of it per token, and loading
leaves it memory-mapped, so only the rows touched are paged in.

int4 group size: a layer whose in_features the asked group does not divide uses the largest of
32/64/128 below it that does (SmolLM2's 576 -> 64 for an asked 128); the rule depends only on
(asked group, in_features), so the loader re-derives it and config.json need not list layers.

A model loaded from a GGUF file as stored (formats/gguf) mixes types, so its record lists its
layers ({"method": "gguf", "layers": {module: [bits, group]}}); int4 layers then carry offsets
(w = q*s + m) instead of zeros, and an untied quantized embedding its own table
("embedding": "table"). A model loaded from a GPTQ/AWQ checkpoint (formats/published) lists its
layers too ("method": "gptq"/"awq"), and its act-order layers ("input_perm": [module, ...]) store
their input permutation. `load_quantized` rebuilds those too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.loading.assemble import release_freed_memory
from minicpm.quantization.linear import GROUP_SIZES, QuantizedLinear, share_equal_permutations

Predicate = Callable[[str, nn.Module], bool]
HEADS = ("int8", "int4", "bf16")
HEAD_INT4_GROUP = 32  # the head decides every token: its int4 form takes the finest group
EMBEDDINGS = ("head", "float")


def default_predicate(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not name.endswith("mlp.gate")


METHODS = ("rtn", "gptq", "awq")  # how the codes were chosen; the stored layout is the same


def make_spec(bits: int = 4, group_size: int = 128, head: str = "int8",
              embedding: str = "head", method: str = "rtn") -> dict[str, Any]:
    """The `config.quantization` record, validated (`embedding` as asked; see `shares_table`)."""
    if method not in METHODS:
        raise MiniCPMError(f"unknown quantization method {method!r}; choose {', '.join(METHODS)}")
    if bits not in (4, 8):
        raise MiniCPMError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise MiniCPMError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if head not in HEADS:
        raise MiniCPMError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if embedding not in EMBEDDINGS:
        raise MiniCPMError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
    return {"method": method, "bits": bits, "group_size": group_size if bits == 4 else None, "head": head,
            "embedding": embedding}


def shares_table(config: MiniCPMConfig, spec: dict[str, Any]) -> bool:
    """Whether the embedding lookups read the quantized head's table (tied, int8/int4 head, not
    "float")."""
    return (bool(config.tie_word_embeddings) and spec["head"] in ("int8", "int4")
            and spec.get("embedding") == "head")


def effective_spec(config: MiniCPMConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as recorded: "embedding" says what the checkpoint holds, "head" only when shared."""
    return {**spec, "embedding": "head" if shares_table(config, spec) else "float"}


def layer_group_size(asked: int, in_features: int, name: str) -> int:
    """The largest allowed group <= asked that divides in_features."""
    for group in sorted(GROUP_SIZES, reverse=True):
        if group <= asked and in_features % group == 0:
            return group
    raise MiniCPMError(f"{name}: in_features {in_features} is not divisible by any int4 group size "
                       f"<= {asked} ({', '.join(map(str, GROUP_SIZES))}); use --bits 8")


def plan(model: nn.Module, spec: dict[str, Any], predicate: Predicate | None = None,
         skip: Iterable[str] = ()) -> dict[str, tuple[int, int | None]]:
    """{module name: (bits, group_size)} for every Linear to swap, the head included."""
    if "layers" in spec:  # listed one by one (a GGUF file's mix)
        return {name: (bits, group) for name, (bits, group) in spec["layers"].items()}
    predicate = predicate or default_predicate
    skip = set(skip)
    chosen: dict[str, tuple[int, int | None]] = {}
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, nn.Linear) and predicate(name, module) and name not in skip:
            group = layer_group_size(spec["group_size"], module.in_features, name) if spec["bits"] == 4 else None
            chosen[name] = (spec["bits"], group)
    if spec["head"] == "int8":
        chosen["lm_head"] = (8, None)
    elif spec["head"] == "int4":
        hidden = model.config.hidden_size
        chosen["lm_head"] = (4, layer_group_size(HEAD_INT4_GROUP, hidden, "lm_head"))
    return chosen


def _skipped(model: nn.Module, chosen: dict) -> list[str]:
    return [name for name, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, nn.Linear) and name not in chosen]


def _note_group_fallbacks(spec: dict[str, Any], chosen: dict) -> None:
    layers = [(bits, g) for name, (bits, g) in chosen.items() if name != "lm_head"]  # the head's is its own
    smaller = sorted({g for bits, g in layers if bits == 4 and g != spec["group_size"]})
    if smaller:
        count = sum(1 for bits, g in layers if bits == 4 and g != spec["group_size"])
        warnings.warn(f"{count} layer(s) use int4 group size {'/'.join(map(str, smaller))} instead of "
                      f"{spec['group_size']}, which does not divide their in_features", stacklevel=4)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, head: str = "int8",
                   predicate: Predicate | None = None, progress: bool = False,
                   embedding: str = "head", dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize `model` in place (round-to-nearest), one decoder layer at a time. `dtype`: of the
    decoder layers' scales (their compute dtype; default: each Linear's own)."""
    from tqdm import tqdm

    from minicpm.quantization.embedding import QuantizedEmbedding

    if model.config.quantization:
        raise MiniCPMError("this model is already quantized")
    spec = effective_spec(model.config, make_spec(bits, group_size, head, embedding))
    chosen = plan(model, spec, predicate)  # before any swap, so a bad layer leaves the model intact
    _note_group_fallbacks(spec, chosen)
    skipped = _skipped(model, chosen)
    for i, layer in enumerate(tqdm(model.model.layers, desc="quantizing", unit="layer", disable=not progress)):
        for name, module in list(layer.named_modules(prefix=f"model.layers.{i}")):
            if name in chosen:
                b, g = chosen[name]
                _swap(model, name, QuantizedLinear.from_float(module, b, g, name=name, dtype=dtype))
    if "lm_head" in chosen:  # a tied head gets its own copy of the table
        model.lm_head = QuantizedLinear.from_float(model.lm_head, *chosen["lm_head"], name="lm_head")
    if shares_table(model.config, spec):  # and the lookups read it: the float table is dropped
        model.model.embed_tokens = QuantizedEmbedding(model.lm_head)
    if skipped:
        spec["skip"] = skipped
    model.config = model.config.replace(quantization=spec)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """The float model of a quantized one, in place: every quantized layer becomes a Linear (or
    Embedding) holding its dequantized weight, in the model's dtype. It computes what the
    quantized layers compute, without the native kernel's int8 rounding of activations."""
    from minicpm.model import Linear
    from minicpm.quantization.embedding import QuantizedEmbedding

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedEmbedding):
            table = module.head.dequantize()
            _swap(model, name, nn.Embedding(table.shape[0], table.shape[1], _weight=table.clone()))
        elif isinstance(module, QuantizedLinear):
            weight = module.dequantize()
            linear = Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            _swap(model, name, linear)
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantizedLinear):
        model.lm_head.weight = model.model.embed_tokens.weight  # tied again, as the float model is
    model.config = model.config.replace(quantization=None)
    return model


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def load_quantized(config: MiniCPMConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
                   dtype: Any = None, device: Any = None, source: str = "checkpoint") -> nn.Module:
    """Rebuild a model saved by `quantize_model` + `save_pretrained`, one tensor at a time."""
    from minicpm.loading.assemble import config_dtype, resolve_device, resolve_dtype
    from minicpm.model import MiniCPMForCausalLM
    from minicpm.quantization.embedding import QuantizedEmbedding

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    spec = _read_spec(config, source)
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    chosen = plan(model, spec, skip=spec.get("skip", ()))
    shared = shares_table(config, spec)
    permuted = set(spec.get("input_perm", ()))
    has_bias = {name: getattr(model.get_submodule(name), "bias", None) is not None for name in chosen}
    params = {n: p for n, p in model.named_parameters()
              if n.rpartition(".")[0] not in chosen}  # a tied head's weight appears as the embedding
    if shared:  # not stored: the lookups read the head's table
        params.pop("model.embed_tokens.weight")
    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in chosen}
    loaded, unexpected = set(), []
    for name, tensor in named_tensors:
        prefix, _, leaf = name.rpartition(".")
        target = dtype or config_dtype(config) or (tensor.dtype if tensor.is_floating_point() else None)
        if prefix in pending and leaf in ("qweight", "scales", "zeros", "offsets", "input_perm", "bias"):
            pending[prefix][leaf] = tensor.to(device)
            if _complete(pending[prefix], chosen[prefix][0], has_bias[prefix], prefix in permuted):
                _place(model, prefix, pending.pop(prefix), chosen[prefix], target, source)
                release_freed_memory()  # else the repacking temporaries pile up: +900 MB for 2B
        elif name in params:
            _check_shape(name, tensor, params[name].shape, source)
            _swap_param(model, name, tensor.to(device=device, dtype=target))
            loaded.add(name)
        elif not name.endswith("rotary_emb.inv_freq"):
            unexpected.append(name)
    _check_complete(unexpected, sorted(set(params) - loaded) + sorted(pending), source)
    if shared:
        model.model.embed_tokens = QuantizedEmbedding(model.lm_head)
    elif "model.embed_tokens" in chosen:  # a quantized table of its own
        model.model.embed_tokens = QuantizedEmbedding(model.model.embed_tokens, owned=True)
    elif config.tie_word_embeddings and "lm_head" not in chosen:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.to(device)
    if permuted:
        share_equal_permutations(model)
    release_freed_memory()
    return model.eval().requires_grad_(False)


def is_quantized_part(name: str) -> bool:
    """A quantized layer's codes, scales or zeros (checkpoint name)."""
    return name.rpartition(".")[2] in ("qweight", "scales", "zeros", "offsets", "input_perm")


def _read_spec(config: MiniCPMConfig, source: str) -> dict[str, Any]:
    q = config.quantization
    if isinstance(q.get("layers"), dict):  # listed one by one: a GGUF file's or a GPTQ/AWQ checkpoint's
        return {**q, "group_size": None}
    if q.get("method") not in METHODS:
        raise CheckpointError(f"{source}: unknown quantization method {q.get('method')!r} in config.json")
    try:
        # no "embedding" key: written before the shared table existed, the float table is stored
        embedding = q.get("embedding", "float")
        return {**make_spec(q["bits"], q.get("group_size") or 128, q.get("head", "int8"), embedding, q["method"]),
                **q, "embedding": embedding}
    except (KeyError, MiniCPMError) as e:
        raise CheckpointError(f"{source}: bad quantization record in config.json: {e}") from None


def _complete(parts: dict, bits: int, bias: bool, permuted: bool = False) -> bool:
    need = {"qweight", "scales"} | ({"bias"} if bias else set()) | ({"input_perm"} if permuted else set())
    return need <= parts.keys() and (bits == 8 or bool({"zeros", "offsets"} & parts.keys()))


def _place(model: nn.Module, name: str, parts: dict, bits_group: tuple, dtype, source: str) -> None:
    bits, group = bits_group
    expected = model.get_submodule(name).weight.shape  # the meta Linear it replaces
    width = expected[1] if bits == 8 else expected[1] // 2
    _check_shape(f"{name}.qweight", parts["qweight"], (expected[0], width), source)
    dtype = dtype or parts["scales"].dtype
    try:
        layer = QuantizedLinear.from_quantized(parts["qweight"], parts["scales"], parts.get("zeros"), bits, group,
                                               parts.get("bias"), dtype=dtype, offsets=parts.get("offsets"),
                                               input_perm=parts.get("input_perm"))
    except MiniCPMError as e:  # the file is damaged: say which layer, and where
        raise CheckpointError(f"{source}: {name}: {e}; the file is damaged, write it again") from None
    _swap(model, name, layer)


def _swap_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Parameter(value, requires_grad=False))


def _check_shape(name: str, tensor: torch.Tensor, shape, source: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{source}: tensor {name} has shape {list(tensor.shape)}, "
                              f"config.json implies {list(shape)}")


def _check_complete(unexpected: list[str], missing: list[str], source: str) -> None:
    for what, names in (("unexpected", sorted(unexpected)), ("missing", missing)):
        if names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise CheckpointError(f"{source}: {len(names)} {what} tensor(s): {shown}")


# Rows of an int8 layer quantized at once when streaming: each row has its own scale, so slices
# give the very codes the whole would, and the fp32 transients of MiniCPM-2B's 122753-row head
# stay ~20 MB each instead of 1.1 GB.
STREAM_ROWS = 2048


@torch.no_grad()
def quantize_tensors(config: MiniCPMConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     spec: dict[str, Any], dtype: Any = None, source: str = "checkpoint",
                     predicate: Predicate | None = None):
    """(config with the quantization record, iterator of the checkpoint's (name, tensor) pairs).

    The streaming form of `quantize_model` + `save_pretrained`: each source tensor is cast to
    the dtype `load` would give it, quantized if it is a chosen Linear's weight, and passed on;
    no model is built. The same names, dtypes and values as that path. Names and shapes are
    checked as `build_model` checks them; missing tensors are reported at the end.
    A chosen Linear may also come quantized already, as (its weight's name, QuantizedLinear)
    with its bias inside (GPTQ/AWQ: layerwise.calibrated_stream); its codes are written as they are.
    """
    from minicpm.loading.assemble import DERIVED_SUFFIXES, config_dtype, resolve_dtype
    from minicpm.model import MiniCPMForCausalLM

    if config.quantization:
        raise MiniCPMError(f"{source} is already quantized")
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        meta = MiniCPMForCausalLM(config)
    chosen = plan(meta, spec, predicate)
    _note_group_fallbacks(spec, chosen)
    spec = effective_spec(config, spec)
    skipped = _skipped(meta, chosen)
    if skipped:
        spec["skip"] = skipped
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}  # a tied head appears as the embedding
    has_bias = {name: meta.get_submodule(name).bias is not None for name in chosen}
    tied_copy = config.tie_word_embeddings and "lm_head" in chosen

    def checked():
        seen, unexpected = set(), []
        for name, tensor in named_tensors:
            if name.endswith(DERIVED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue  # recomputed / the tie wins, as build_model does
            if name not in shapes:
                unexpected.append(name)
                continue
            if isinstance(tensor, QuantizedLinear):
                yield from _prequantized_state(name, tensor, chosen, has_bias, seen)
                continue
            _check_shape(name, tensor, shapes[name], source)
            if not tensor.is_floating_point():
                raise CheckpointError(f"{source}: tensor {name} has non-float dtype {tensor.dtype}")
            tensor = tensor.to(dtype or config_dtype(config) or tensor.dtype)
            seen.add(name)
            if name == "model.embed_tokens.weight" and tied_copy:
                if not shares_table(config, spec):
                    yield name, tensor
                yield "lm_head.weight", tensor  # the head's own copy, quantized next
            else:
                yield name, tensor
        missing = sorted(set(shapes) - seen)
        _check_complete(unexpected, missing, source)

    return config.replace(quantization=spec), quantize_linears(checked(), chosen, has_bias)


def quantize_linears(named_tensors: Iterable[tuple[str, torch.Tensor]], chosen: dict[str, tuple[int, int | None]],
                     has_bias: dict[str, bool]):
    """The (name, tensor) pairs passed on, except that each chosen Linear's weight (and bias)
    become its quantized checkpoint tensors, once both have come by."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named_tensors:
        module, _, leaf = name.rpartition(".")
        if module in chosen and leaf in ("weight", "bias"):
            parts = pending.setdefault(module, {})
            parts[leaf] = tensor
            if "weight" in parts and ("bias" in parts or not has_bias[module]):
                yield from quantized_state(module, pending.pop(module), chosen[module])
        else:
            yield name, tensor


def _prequantized_state(name: str, layer: QuantizedLinear, chosen: dict, has_bias: dict, seen: set):
    module = name.rpartition(".")[0]
    if (layer.bits, layer.group_size) != chosen.get(module):
        raise MiniCPMError(f"{module}: quantized as int{layer.bits} group {layer.group_size}, "
                           f"the plan says {chosen.get(module)}")
    seen.update({name} | ({f"{module}.bias"} if has_bias[module] else set()))
    for leaf, tensor in layer.portable_state().items():
        yield f"{module}.{leaf}", tensor


def quantized_state(name: str, parts: dict[str, torch.Tensor], bits_group: tuple):
    """The checkpoint tensors of one quantized Linear, through QuantizedLinear itself."""
    bits, group = bits_group
    weight, bias = parts["weight"], parts.get("bias")
    rows = weight.shape[0]
    step = STREAM_ROWS if bits == 8 else rows
    state: dict[str, torch.Tensor] = {}
    for i in range(0, rows, step):
        piece = _quantize_rows(weight[i:i + step], None if bias is None else bias[i:i + step], bits, group, name)
        if step >= rows:
            state = piece
            break
        for leaf, tensor in piece.items():  # per-row codes and scales: the slices fill the whole layer's
            if leaf not in state:
                state[leaf] = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype)
            state[leaf][i:i + step] = tensor
    for leaf, tensor in state.items():
        yield f"{name}.{leaf}", tensor
    release_freed_memory()  # the layer's temporaries, as when loading


def _quantize_rows(weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group: int | None,
                   name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return dict(QuantizedLinear.from_float(linear, bits, group, name=name).portable_state())
