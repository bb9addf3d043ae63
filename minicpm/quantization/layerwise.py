"""Calibrated quantization (GPTQ, AWQ) of a checkpoint, one decoder layer at a time.

The source is a stream of named tensors. The embedding turns the calibration ids into the
first layer's inputs; then for each decoder layer: its tensors are read, the layer is built in
float32, quantized against its inputs (gptq.py / awq.py), its outputs become the next layer's
inputs, and it is handed on as QuantizedLinear modules (plus its norms, which AWQ changes) and
dropped. Memory: one float32 layer, the calibration activations (inputs and outputs of the layer,
samples x seqlen x hidden each, plus AWQ's captured Linear inputs), and the tensors the source
gives ahead of need. Everything else (embedding, final norm, head) is passed on as read, for
`quantize_tensors` to treat as round-to-nearest does.

GPTQ is true-sequential as AutoGPTQ: q,k,v -> o -> gate,up -> down, each sub-group's Hessian
collected with the earlier sub-groups already quantized (a forward pass that stops at the
sub-group's input), and the next layer sees the quantized layer's outputs. AWQ follows AutoAWQ:
every Linear input captured in one float pass, scales searched and folded, clipping searched,
codes rounded; the next layer sees the float layer's outputs.

Act-order runs with static groups (AutoGPTQ's `static_groups=True`): columns are visited in
order of decreasing Hessian diagonal, but each group's scale and zero come from its contiguous
columns, so g_idx is k // G and the layer is our plain int4 form: no permutation at inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.quantization import awq
from minicpm.quantization.gptq import Hessian, gptq_quantize
from minicpm.quantization.linear import QuantizedLinear
from minicpm.quantization.quantize import plan

METHODS = ("gptq", "awq")
CHUNK = 8          # calibration sequences per forward call
PROBE = 8          # sequences on which each layer's reconstruction error is reported
# AutoGPTQ's true-sequential order for Llama-like blocks
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@dataclass(frozen=True)
class Settings:
    method: str
    bits: int
    sym: bool = False
    act_order: bool = False
    mse: bool = False


def layer_order(name: str) -> tuple[int, int]:
    """Sort key that reads a checkpoint as the layer-by-layer pass consumes it: the embedding,
    then decoder layer 0, 1, ..., then everything else."""
    if name == "model.embed_tokens.weight":
        return (0, 0)
    if name.startswith("model.layers."):
        index = name.split(".")[2]
        if index.isdigit():
            return (1, int(index))
    return (2, 0)


class TensorStream:
    """Named tensors from a single-pass iterator, by name: what is read ahead of need is kept."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]):
        self._it, self._held = iter(tensors), {}

    def take(self, names: Iterable[str], source: str) -> dict[str, torch.Tensor]:
        wanted = set(names)
        while not wanted <= self._held.keys():
            try:
                name, tensor = next(self._it)
            except StopIteration:
                missing = sorted(wanted - self._held.keys())
                raise CheckpointError(f"{source}: {len(missing)} missing tensor(s): {', '.join(missing[:8])}") from None
            self._held[name] = tensor
        return {name: self._held.pop(name) for name in names}

    def rest(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._held.items()
        self._held = {}
        yield from self._it


class LayerRunner:
    """Runs one decoder layer over the calibration activations, a chunk of sequences at a time."""

    def __init__(self, config: MiniCPMConfig, seqlen: int):
        from minicpm.model import RotaryEmbedding, _attention_mask

        self.cos, self.sin = RotaryEmbedding(config)(torch.arange(seqlen)[None], seqlen)
        self.mask = _attention_mask(None, 0, seqlen, config.sliding_window, torch.device("cpu"))

    def layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x[i:i + CHUNK], self.cos, self.sin, self.mask, None)
                          for i in range(0, x.shape[0], CHUNK)])

    def attention(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda h: layer.self_attn(h, self.cos, self.sin, self.mask, None)


class _Stop(Exception):
    """Raised by a hook once the input it waits for has been seen: the rest of the pass is moot."""


def feed_inputs(layer: nn.Module, runner: LayerRunner, x: torch.Tensor, name: str,
                sink: Callable[[torch.Tensor], None], stop: bool = True) -> torch.Tensor | None:
    """Run x through the layer chunk by chunk, handing the input of sub-module `name` to sink;
    with `stop`, each chunk's pass ends there (None returned), else the outputs are returned."""
    def hook(_module, args):
        sink(args[0].detach())
        if stop:
            raise _Stop

    handle = layer.get_submodule(name).register_forward_pre_hook(hook)
    outputs = []
    try:
        for i in range(0, x.shape[0], CHUNK):
            try:
                outputs.append(layer(x[i:i + CHUNK], runner.cos, runner.sin, runner.mask, None))
            except _Stop:
                pass
    finally:
        handle.remove()
    return None if stop else torch.cat(outputs)


def capture_inputs(layer: nn.Module, runner: LayerRunner, x: torch.Tensor, names: list[str]
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: its input over every sequence}, the layer's outputs), in one float pass."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].detach())) for name in names]
    try:
        out = runner.layer(layer, x)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}, out


class _Replay(nn.Module):
    """Stands in for a sub-module whose outputs over the calibration set are already known: hands
    them back chunk after chunk, in the order a pass asks for them (every pass walks x in order)."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs, self.at = outputs, 0

    def forward(self, x: torch.Tensor, *_args) -> torch.Tensor:
        out = self.outputs[self.at:self.at + x.shape[0]]
        self.at += x.shape[0]
        return out


@contextlib.contextmanager
def replaying(layer: nn.Module, name: str, outputs: torch.Tensor | None):
    """Within the block, the layer's child `name` returns `outputs` instead of running (None: runs)."""
    if outputs is None:
        yield
        return
    original = getattr(layer, name)
    setattr(layer, name, _Replay(outputs))
    try:
        yield
    finally:
        setattr(layer, name, original)


def relative_error(out: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> float:
    """||out - reference|| / ||reference - x||: the error against the layer's own update of the
    residual stream (the residual itself would hide it)."""
    return float((out - reference).norm() / (reference - x).norm().clamp(min=1e-30))


# --- one layer --------------------------------------------------------------------------------------
def gptq_layer(layer: nn.Module, runner: LayerRunner, x: torch.Tensor, groups: dict[str, int | None],
               settings: Settings) -> tuple[dict[str, tuple], torch.Tensor]:
    """Quantize the layer's Linears in place (their weights become the dequantized ones);
    ({name: (codes, scales, zeros)}, the quantized layer's outputs).

    Once o_proj is quantized the attention block's output is final: it is computed once from
    o_proj's inputs and replayed in the later passes (gate/up, down, the outputs) instead of
    running q, k, v and attention again in each: 9 Linear calls per sequence instead of 20."""
    results, attention = {}, None
    for names in SEQUENTIAL:
        hessian = Hessian(layer.get_submodule(names[0]).in_features)
        o_inputs = [] if names == ("self_attn.o_proj",) else None

        def sink(t: torch.Tensor) -> None:
            hessian.add(t)
            if o_inputs is not None:
                o_inputs.append(t)

        with replaying(layer, "self_attn", attention):
            feed_inputs(layer, runner, x, names[0], sink)
        for name in names:
            linear = layer.get_submodule(name)
            res = gptq_quantize(linear.weight, hessian.matrix, settings.bits, groups[name], settings.sym,
                                act_order=settings.act_order, static_groups=settings.act_order, mse=settings.mse)
            linear.weight.copy_(res.weight)
            results[name] = (res.codes, res.scales, res.zeros)
        if o_inputs:
            attention = _attention_outputs(layer.self_attn.o_proj, o_inputs, x)
        del hessian, o_inputs
    with replaying(layer, "self_attn", attention):
        return results, runner.layer(layer, x)


def _attention_outputs(o_proj: nn.Module, o_inputs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """o_proj over its captured inputs, chunk by chunk, each input freed once used: one more
    tensor of x's size at a time, not two (604 MB each for MiniCPM-2B at the defaults)."""
    out, at = torch.empty_like(x), 0
    while o_inputs:
        part = o_inputs.pop(0)
        out[at:at + part.shape[0]] = o_proj(part)
        at += part.shape[0]
    return out


def awq_layer(layer: nn.Module, runner: LayerRunner, x: torch.Tensor, groups: dict[str, int | None],
              settings: Settings, model_type: str) -> tuple[dict[str, tuple], torch.Tensor]:
    """Scale, clip and quantize the layer's Linears in place (norms and weights folded, weights
    then the dequantized ones); ({name: (codes, scales, zeros)}, the float layer's outputs)."""
    plan = awq.scaling_groups(layer, model_type)
    features, out = capture_inputs(layer, runner, x, sorted({g.inputs for g in plan}))
    bits, sym = settings.bits, settings.sym
    scales = []
    for g in plan:
        linears = [layer.get_submodule(n) for n in g.linears]
        inspect = (runner.attention(layer) if g.inspect == "self_attn"
                   else layer.get_submodule(g.inspect or g.linears[0]))
        scales.append(awq.search_scale(features[g.inputs], linears, inspect, bits, groups[g.linears[0]], sym)[0])
    for g, s in zip(plan, scales):
        awq.fold_scales(layer.get_submodule(g.prev), [layer.get_submodule(n) for n in g.linears], s)
        features[g.inputs] = features[g.inputs] / s
    results = {}
    for g in plan:
        for name in g.linears:
            linear = layer.get_submodule(name)
            if not name.endswith(awq.NO_CLIP):
                awq.apply_clip(linear, awq.search_clip(linear.weight, features[g.inputs], bits, groups[name], sym))
            codes, s, z = awq.awq_codes(linear.weight.float(), bits, groups[name], sym)
            linear.weight.copy_(awq.grid_values(codes, s, z))
            results[name] = (codes, s, z)
    return results, out


# --- the checkpoint ---------------------------------------------------------------------------------
def check_supported(config: MiniCPMConfig, settings: Settings) -> None:
    if settings.method not in METHODS:
        raise MiniCPMError(f"unknown calibrated method {settings.method!r}; choose {', '.join(METHODS)}")
    if config.num_experts:
        raise MiniCPMError(f"--method {settings.method} does not handle mixture-of-experts layers; use --method rtn")
    for flag, value in (("--act-order", settings.act_order), ("--mse", settings.mse)):
        if value and settings.method != "gptq":
            raise MiniCPMError(f"{flag} is a GPTQ option: drop it, or pass --method gptq")


def calibrated_stream(config: MiniCPMConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], ids: torch.Tensor,
                      spec: dict, settings: Settings, dtype=None, source: str = "checkpoint",
                      progress: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedLinear]]:
    """The source's (name, tensor) pairs with every decoder Linear the spec chooses replaced by
    (name.weight, QuantizedLinear) holding its GPTQ/AWQ codes, and AWQ's folded norms."""
    from tqdm import tqdm

    from minicpm.loading.assemble import config_dtype, release_freed_memory, resolve_dtype
    from minicpm.model import MiniCPMForCausalLM

    check_supported(config, settings)
    with torch.device("meta"):
        chosen = plan(MiniCPMForCausalLM(config), spec)
    stream = TensorStream(named_tensors)
    embed = stream.take(["model.embed_tokens.weight"], source)["model.embed_tokens.weight"]
    if embed.shape != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"{source}: tensor model.embed_tokens.weight has shape {list(embed.shape)}, "
                              f"config.json implies {[config.vocab_size, config.hidden_size]}")
    if ids.shape[1] > config.max_position_embeddings:
        raise MiniCPMError(f"--seqlen {ids.shape[1]} is longer than the model's context "
                           f"({config.max_position_embeddings} tokens): pass --seqlen {config.max_position_embeddings} "
                           "or less")
    if int(ids.max()) >= config.vocab_size:
        raise MiniCPMError(f"calibration token id {int(ids.max())} is outside the vocabulary ({config.vocab_size})")
    x = embed[ids].float() * config.embedding_scale
    target = resolve_dtype(dtype) or config_dtype(config) or embed.dtype
    yield "model.embed_tokens.weight", embed
    del embed
    runner = LayerRunner(config, ids.shape[1])
    bar = tqdm(range(config.num_hidden_layers), desc=f"{settings.method} int{settings.bits}", unit="layer",
               disable=not progress)
    for i in bar:
        prefix = f"model.layers.{i}."
        layer = _read_layer(config, i, stream, source)
        groups = {name: chosen[prefix + name][1] for name, m in layer.named_modules()
                  if isinstance(m, nn.Linear) and prefix + name in chosen}
        with torch.no_grad():  # the bar's error: float vs quantized layer on the first samples
            probe = x[:PROBE]
            if settings.method == "gptq":  # the next layer reads this layer's quantized outputs
                reference = runner.layer(layer, probe) if progress else None
                results, x_next = gptq_layer(layer, runner, x, groups, settings)
                quantized = x_next[:PROBE]
            else:  # ... AWQ's reads the float layer's
                results, x_next = awq_layer(layer, runner, x, groups, settings, config.model_type)
                reference = x_next[:PROBE]
                quantized = runner.layer(layer, probe) if progress else None
        if progress:
            bar.set_postfix(err=f"{relative_error(quantized, reference, probe):.4f}")
        yield from _layer_outputs(layer, prefix, results, groups, settings.bits, target)
        x = x_next
        del layer, results, x_next
        release_freed_memory()
    yield from stream.rest()


def _read_layer(config: MiniCPMConfig, index: int, stream: TensorStream, source: str) -> nn.Module:
    """Decoder layer `index` in float32, from its tensors in the stream."""
    from minicpm.model import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(config, index)
    prefix = f"model.layers.{index}."
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    tensors = stream.take([prefix + name for name in shapes], source)
    for name, shape in shapes.items():
        tensor = tensors[prefix + name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{source}: tensor {prefix + name} has shape {list(tensor.shape)}, "
                                  f"config.json implies {list(shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {prefix + name} has non-float dtype {tensor.dtype}")
    layer.load_state_dict({name: tensors[prefix + name].float() for name in shapes}, assign=True)
    return layer.requires_grad_(False)


def _layer_outputs(layer: nn.Module, prefix: str, results: dict[str, tuple], groups: dict[str, int | None],
                   bits: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | QuantizedLinear]]:
    for name, param in layer.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module in results:
            if leaf == "weight":
                yield prefix + name, _quantized_linear(layer.get_submodule(module), results[module], groups[module],
                                                       bits, dtype)
        else:
            yield prefix + name, param.detach()  # norms (AWQ: with its scales folded in)


def _quantized_linear(linear: nn.Linear, result: tuple, group: int | None, bits: int,
                      dtype: torch.dtype) -> QuantizedLinear:
    codes, scales, zeros = result
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    if bits == 8:
        return QuantizedLinear(linear.in_features, linear.out_features, 8, None, codes.to(torch.int8),
                               scales.reshape(-1).to(dtype), None, bias)
    return QuantizedLinear(linear.in_features, linear.out_features, 4, group, codes.to(torch.uint8),
                           scales.to(dtype), zeros.to(dtype), bias)
