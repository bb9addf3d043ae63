"""Hugging Face checkpoint directories: config.json + safetensors or pytorch_model.bin (+ index).

Reading streams one tensor at a time (safetensors through `safe_open`, .bin files memory-mapped
with `weights_only=True`). Writing produces what transformers, vLLM and our loader read back:
config.json, generation_config.json, sharded safetensors with an index, tokenizer files. The
directory is written next to its destination and renamed into place, so an interrupted save
never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.formats.weights import build_model, resolve_dtype

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order transformers prefers them."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid index file: {e}") from None
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(absent)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return [directory / name]
    raise CheckpointError(
        f"{directory} has no weights (model.safetensors, pytorch_model.bin or their index)")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the given files, one at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path)
        else:
            yield from _iter_bin(path)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"{path} is not a readable PyTorch weights file: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    yield from state.items()


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def load_model(directory: str | Path, dtype: Any = None, device: Any = None):
    """The model of a Hugging Face checkpoint directory (quantization re-applied if recorded)."""
    directory = Path(directory)
    config = MiniCPMConfig.from_file(directory / "config.json")
    foreign = config.extra.get("quantization_config")
    if foreign:
        method = foreign.get("quant_method", "unknown") if isinstance(foreign, dict) else "unknown"
        raise CheckpointError(f"{directory} holds {method}-quantized weights, which this version cannot "
                              "load yet; use the bf16/fp16/fp32 release of the model")
    files = weight_files(directory)
    if config.quantization:  # our own: rebuild the quantized layers, then fill them
        from minicpm.quantization import load_quantized

        return load_quantized(config, iter_tensors(files), dtype=dtype, device=device, source=str(directory))
    return build_model(config, iter_tensors(files), dtype=dtype, device=device, source=str(directory))


def load_pretrained(directory: str | Path, dtype: Any = None, device: Any = None):
    """(model, tokenizer) from a checkpoint directory; tokenizer is None if it has none."""
    from minicpm.tokenizer import Tokenizer

    model = load_model(directory, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(directory) if Tokenizer.exists(directory) else None
    return model, tokenizer


def save_pretrained(model, tokenizer, out_dir: str | Path, *, dtype: Any = None,
                    max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                    config: MiniCPMConfig | None = None, state_dict: dict | None = None) -> Path:
    """Write a Hugging Face directory that loads back identically.

    `config`/`state_dict` override the model's own (converters use this to write a folded
    llama-format checkpoint without building a second model).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MiniCPMError(f"{out_dir} already exists and is not empty (pass overwrite=True / --force)")
    config = config or model.config
    state = state_dict if state_dict is not None else checkpoint_state_dict(model)
    target = resolve_dtype(dtype)
    if target is not None:
        state = {k: v.to(target) for k, v in state.items()}
    stored = next(iter(state.values())).dtype
    config = config.replace(torch_dtype=str(stored).removeprefix("torch."))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save(tmp / "config.json")
        _write_generation_config(config, tmp)
        _write_shards(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: a tied head is not written twice."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _write_generation_config(config: MiniCPMConfig, out: Path) -> None:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _replace_dir(new: Path, dest: Path) -> None:
    """Move `new` to `dest`; an existing `dest` is kept until the new one is in place."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
