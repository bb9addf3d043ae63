"""A conversation's KV cache on disk (`minicpm chat --prompt-cache PATH`, or the Python API).

A long document costs minutes of prefill on a laptop CPU; saved once, it comes back in the time
the file takes to read. The file is safetensors: every layer's stores over the cached positions
(keys and values, and the scales of an int8/int4 cache) and the token ids they hold; its metadata
names the format, the cache kind, the dtype and a fingerprint of the model. A file from another
model (other config or other weights), another cache kind or dtype, or a damaged file is refused
with the reason. Tokens that differ from a new prompt's are simply not reused past the common
prefix (`PromptCache.reuse`), so a stale file costs a prefill, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from minicpm.cache import Int4KVCache, Int8KVCache, make_cache
from minicpm.errors import MiniCPMError
from minicpm.generation.generate import PromptCache

FORMAT = "minicpm-prompt-cache/2"  # 2: int4 keys scaled per channel in blocks (Int4KVCache)
_KINDS = {Int4KVCache: "int4", Int8KVCache: "int8"}  # anything else: "auto" (the model's dtype)
_SAMPLE = 256  # bytes hashed from each end of every tensor


def cache_kind(cache) -> str:
    return _KINDS.get(type(cache), "auto")


def model_fingerprint(model) -> str:
    """sha256 of the config and of every tensor's name, shape, dtype and first and last bytes.

    Reading a few bytes of each tensor (not all of them) keeps this instant for a 2B model, and a
    fine-tune changes every matrix it touches (a merged LoRA delta is dense), so another
    checkpoint of the same shape is told apart."""
    digest = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(raw[:_SAMPLE].numpy().tobytes() + raw[-_SAMPLE:].numpy().tobytes())
    return digest.hexdigest()


def save_prompt_cache(prompt_cache: PromptCache, model, path: str | Path) -> int:
    """Write the cached positions of `prompt_cache` to `path` (a crash leaves the old file,
    never half a new one). Returns the number of tokens saved."""
    cache, ids = prompt_cache.cache, prompt_cache.ids
    if cache is None or not ids:
        raise MiniCPMError("the prompt cache is empty: nothing to save")
    count = cache.resumable(min(len(ids), cache.length))
    tensors = {f"{name}.{layer}": store[:, :, cache.span(name, 0, count)].contiguous()
               for name in cache.STORES for layer, store in enumerate(getattr(cache, name))}
    tensors["ids"] = torch.tensor(ids[:count], dtype=torch.int64)
    meta = {"format": FORMAT, "kind": cache_kind(cache), "dtype": str(cache.dtype).removeprefix("torch."),
            "tokens": str(count), "model": model_fingerprint(model)}
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = check_cache_path(path)
    try:  # save_file writes a temporary file beside `path` and renames it: never half a file
        save_file(tensors, str(path), metadata=meta)
    except (SafetensorError, OSError) as e:
        raise MiniCPMError(f"cannot write the prompt cache {path}: {e}") from None
    return count


def check_cache_path(path: str | Path) -> Path:
    """`path` as a Path if a prompt cache can be read from or written to it, else a clear error
    (checked before a chat starts, so that its end does not fail to save)."""
    path = Path(path)
    if path.is_dir():
        raise MiniCPMError(f"prompt cache {path} is a directory: give a file path, e.g. {path / 'chat.kv'}")
    parent = path.parent
    if not parent.is_dir():
        raise MiniCPMError(f"prompt cache {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise MiniCPMError(f"prompt cache {path}: the directory {parent} is not writable")
    return path


def load_prompt_cache(model, path: str | Path) -> PromptCache:
    """The PromptCache saved in `path`, checked against `model` and its KV cache kind."""
    from safetensors import SafetensorError, safe_open

    path = check_cache_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                if str(meta.get("format")).startswith(FORMAT.split("/")[0] + "/"):
                    raise MiniCPMError(f"{path} was written by another version of minicpm (format "
                                       f"{meta['format']}, this one reads {FORMAT}): delete it to start afresh")
                raise MiniCPMError(f"{path} is not a minicpm prompt cache (format {meta.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:  # not safetensors, truncated, unreadable
        raise MiniCPMError(f"cannot read the prompt cache {path}: {e}") from None
    want = model.kv_cache_dtype
    if "ids" not in tensors or meta.get("kind") not in ("auto", "int8", "int4") or "dtype" not in meta:
        raise MiniCPMError(f"{path} is damaged: its token ids, cache kind or dtype are missing")
    if meta["kind"] != want:
        raise MiniCPMError(f"{path} holds a {meta['kind']} KV cache; run with --kv-cache {meta['kind']} "
                           f"to use it (this run's is {want})")
    if meta["dtype"] != str(model.dtype).removeprefix("torch."):
        raise MiniCPMError(f"{path} was saved with the model in {meta['dtype']}, not {model.dtype}: "
                           f"load the model with --dtype {meta['dtype']} to use it")
    if meta.get("model") != model_fingerprint(model):
        raise MiniCPMError(f"{path} was saved from another model (or other weights): delete it to start afresh")
    ids = tensors.pop("ids").tolist()
    cache = make_cache(model.config, 1, max(len(ids), 1), meta["kind"], dtype=model.dtype, device=model.device)
    for name in cache.STORES:
        part = cache.span(name, 0, len(ids))
        for layer, store in enumerate(getattr(cache, name)):
            saved = tensors.get(f"{name}.{layer}")
            if saved is None or saved.shape != store[:, :, part].shape or saved.dtype != store.dtype:
                raise MiniCPMError(f"{path} is damaged: {name}.{layer} is missing or of another shape")
            store[:, :, part] = saved
    cache.length = len(ids)
    return PromptCache(cache=cache, ids=ids)
