"""Turn (name, tensor) pairs from any checkpoint format into a ready model.

Every loader (Hugging Face directories, GGUF) ends here. The model is built on the meta device,
so no memory is spent on random initial weights; each tensor is converted and assigned as it
arrives, so peak memory stays near one copy of the model plus one tensor. Every name is checked:
missing, unexpected and mis-shaped tensors are errors that name the tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.kernels.allocator import apply_heap_policy
from minicpm.model import MiniCPMForCausalLM

# Rotary tables some checkpoints carry; they are recomputed from the config.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """None/"auto" keep the checkpoint's dtype; strings like "bf16" or torch dtypes are accepted."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise MiniCPMError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise MiniCPMError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[key]


def resolve_device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise MiniCPMError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MiniCPMError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; "
                           "use --device cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise MiniCPMError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return resolved


def build_model(config: MiniCPMConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
                dtype: Any = None, device: Any = None, source: str = "checkpoint") -> MiniCPMForCausalLM:
    """Assemble a model from checkpoint tensors (Hugging Face names), in eval mode.

    A value may also be a ready module (a GGUF tensor's blocks held as stored): it replaces the
    module that owns `name` (for a tied head: "lm_head.weight" and "model.embed_tokens.weight")."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    apply_heap_policy()  # only where MINICPM_HEAP asks (kernels/allocator.py says why)
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    loaded: set[str] = set()
    unexpected: list[str] = []
    replaced: set[str] = set()
    for name, tensor in named_tensors:
        if name.endswith(DERIVED_SUFFIXES):
            continue
        if isinstance(tensor, nn.Module):
            _check_module_shape(name, tensor, params, source)
            owner = name.rpartition(".")[0]
            _swap_module(model, owner, tensor.to(device))
            replaced.add(owner)
            loaded.add(name)
            loaded.update(n for n in params if n.rpartition(".")[0] == owner)  # its bias comes with it
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store a copy of the embedding; the tie wins
        if name not in params:
            unexpected.append(name)
            continue
        expected = params[name].shape
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}, "
                f"config.json implies {list(expected)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has non-float dtype {tensor.dtype}")
        target = dtype or (config_dtype(config) or tensor.dtype)
        _assign(model, name, tensor.to(device=device, dtype=target))
        loaded.add(name)
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s): {shown}")
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: {len(missing)} missing tensor(s): {shown}")
    if config.tie_word_embeddings and not replaced & {"lm_head", "model.embed_tokens"}:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.to(device)  # its tables are computed from the config, not loaded
    return model.eval().requires_grad_(False)


def config_dtype(config: MiniCPMConfig) -> torch.dtype | None:
    """The dtype config.json declares (torch_dtype), if any."""
    name = config.torch_dtype
    return DTYPES.get(str(name).removeprefix("torch.")) if name else None


def _swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _check_module_shape(name: str, module: nn.Module, params: dict, source: str) -> None:
    """A ready Linear/Embedding-like module against the weight it stands for."""
    shape = (getattr(module, "out_features", None) or getattr(module, "num_embeddings", None),
             getattr(module, "in_features", None) or getattr(module, "embedding_dim", None))
    expected = params.get(name, params.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
    if expected is None or tuple(expected.shape) != shape:
        raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, config.json implies "
                              f"{None if expected is None else list(expected.shape)}")


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    layout = getattr(module, attr)
    if layout is not None and not layout.is_contiguous() and layout.stride() != value.stride():
        # a weight the model keeps in another memory layout (MLP: FATReLU's down, a row per neuron)
        value = torch.empty_strided(value.shape, layout.stride(), dtype=value.dtype,
                                    device=value.device).copy_(value)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def random_model(config: MiniCPMConfig, seed: int = 0, dtype: Any = torch.float32,
                 std: float | None = None) -> MiniCPMForCausalLM:
    """A seeded random model (tests, benchmarks): N(0, std) linears/embedding, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range if std is None else std
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MiniCPMForCausalLM(config).named_parameters()}

    tensors = ((name, random_value(name, shape, gen, std)) for name, shape in shapes.items())
    return build_model(config, tensors, dtype=dtype, device="cpu", source="random")


def random_value(name: str, shape, generator: torch.Generator, std: float) -> torch.Tensor:
    """A random model's fp32 tensor: N(0, std), norms near 1."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return std * torch.randn(shape, generator=generator)


@contextlib.contextmanager
def one_thread():
    """For many small tensor operations (repacking a GGUF file's blocks, GPTQ's columns, AWQ's
    grids): each is a parallel region of the OpenMP pool, and on a busy machine every region waits
    for a time slice. SmolLM2's repacking with another process running: 0.8 s on one thread,
    3-6 s on two; GPTQ of a 1536x576 weight on the loaded 2-core machine: 0.7 s vs 15.2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc). Repacking a layer's codes frees
    temporaries of a few times its size, which glibc keeps in its heap (below its mmap threshold,
    up to 32 MB): loading MiniCPM-2B int4 peaked 900 MB above its final size without this, and
    MiniCPM-1B's q4_0 GGUF as stored kept 158 MB too many."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
