"""Hugging Face checkpoint directories: config.json + safetensors or pytorch_model.bin (+ index).

Reading streams one tensor at a time (safetensors through `safe_open`, .bin files memory-mapped
with `weights_only=True`). Writing produces what transformers, vLLM and our loader read back:
config.json, generation_config.json, sharded safetensors with an index, tokenizer files. The
directory is written next to its destination and renamed into place, so an interrupted save
never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minicpm.config import MiniCPMConfig, read_config_json
from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.files import atomic_dir
from minicpm.loading.assemble import build_model, resolve_dtype

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
    named = sorted(directory.glob("*.safetensors"))  # AutoGPTQ: <model_file_base_name>.safetensors
    if named:
        return named
    raise CheckpointError(
        f"{directory} has no weights (model.safetensors, pytorch_model.bin or their index)")


def iter_tensors(files: list[Path], copy: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the given files, one at a time.

    Tensors are memory-mapped. With `copy`, safetensors tensors for which copy(name) is true are
    read into memory of their own instead: for a reader that converts them anyway (quantized codes
    packed for the kernels, tensors being quantized), a mapping would keep every page it touched
    in the process's RSS until the whole file is closed, on top of the converted copy.
    """
    for path in files:
        if path.suffix != ".safetensors":
            yield from _iter_bin(path)
        elif copy is None:
            yield from _iter_safetensors(path)
        else:
            yield from _iter_safetensors_reading(path, copy)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


_SAFETENSORS_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor entries, offset of the data) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path} is not a readable safetensors file: bad header length")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            count = math.prod(int(d) for d in entry["shape"])
            valid = (entry["dtype"] in _SAFETENSORS_TORCH and 0 <= begin <= end <= size - 8 - length
                     and count * _SAFETENSORS_TORCH[entry["dtype"]].itemsize == end - begin)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path} is not a readable safetensors file: bad entry for {name}")
    return header, 8 + length


def _read_entry(raw, path: Path, start: int, name: str, entry: dict[str, Any]) -> torch.Tensor:
    """One tensor of an open safetensors file, read into memory of its own."""
    begin, end = entry["data_offsets"]
    data = torch.empty(end - begin, dtype=torch.uint8)
    raw.seek(start + begin)
    if raw.readinto(memoryview(data.numpy())) != end - begin:
        raise CheckpointError(f"{path} is not a readable safetensors file: {name} is truncated")
    return data.view(_SAFETENSORS_TORCH[entry["dtype"]]).reshape(entry["shape"])


def iter_tensors_ordered(files: list[Path], key: Callable[[str], Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the given safetensors files, read into memory of its own, in the order of
    key(name) across all files (e.g. decoder layer by layer, which the files' own order, by
    name, is not: layers.10 comes before layers.2)."""
    entries = []
    for path in files:
        header, start = _safetensors_header(path)
        entries += [(key(name), path, start, name, entry) for name, entry in header.items()]
    entries.sort(key=lambda e: e[0])
    with ExitStack() as stack:  # each file opened once, however the order jumps
        opened: dict[Path, Any] = {}
        for _, path, start, name, entry in entries:
            if path not in opened:
                opened[path] = stack.enter_context(open(path, "rb"))
            yield name, _read_entry(opened[path], path, start, name, entry)


def _iter_safetensors_reading(path: Path, copy: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    header, start = _safetensors_header(path)
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])  # one forward pass over the file
    with ExitStack() as stack:
        mapped = None
        raw = stack.enter_context(open(path, "rb"))
        for name in names:
            entry = header[name]
            if copy(name):
                yield name, _read_entry(raw, path, start, name, entry)
            else:
                if mapped is None:
                    try:
                        mapped = stack.enter_context(safe_open(str(path), framework="pt"))
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
                yield name, mapped.get_tensor(name)


def tensor_names(files: list[Path]) -> list[str]:
    """The names of the tensors in the given files, read from the headers (.bin: mapped)."""
    names: list[str] = []
    for path in files:
        if path.suffix == ".safetensors":
            names += list(_safetensors_header(path)[0])
        else:
            names += [name for name, _ in _iter_bin(path)]
    return names


def tensor_bytes(files: list[Path]) -> dict[str, int]:
    """Each tensor's stored size in bytes, read from the safetensors headers (nothing loaded)."""
    sizes: dict[str, int] = {}
    for path in files:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: tensor sizes are read from safetensors headers only")
        sizes.update({name: entry["data_offsets"][1] - entry["data_offsets"][0]
                      for name, entry in _safetensors_header(path)[0].items()})
    return sizes


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


def is_vision_checkpoint(directory: Path) -> bool:
    """Whether config.json describes MiniCPM-V (model_type minicpmv)."""
    from minicpm.vision.config import is_minicpmv_config

    return is_minicpmv_config(read_config_json(directory / "config.json"))


def read_config(directory: Path) -> MiniCPMConfig:
    """config.json of a float (or our own quantized) checkpoint directory; other tools' quantized
    formats, which minicpm.formats.published reads, are refused by name."""
    config = MiniCPMConfig.from_file(directory / "config.json")
    foreign = config.extra.get("quantization_config")
    if foreign:
        method = foreign.get("quant_method", "unknown") if isinstance(foreign, dict) else "unknown"
        raise CheckpointError(f"{directory} holds {method}-quantized weights, and this step needs float "
                              "weights: use the float release of the model (minicpm.load and "
                              "`minicpm convert` read the quantized one)")
    return config


def load_model(directory: str | Path, dtype: Any = None, device: Any = None):
    """The model of a Hugging Face checkpoint directory (quantization re-applied if recorded);
    a MiniCPM-V directory gives a minicpm.vision.MiniCPMV."""
    directory = Path(directory)
    if is_vision_checkpoint(directory):
        from minicpm.vision import MiniCPMVConfig, build_minicpmv

        config = MiniCPMVConfig.from_file(directory / "config.json")
        # a quantized decoder's codes read into memory of their own, as below
        copy = _quantized_part() if config.llm.quantization else None
        return build_minicpmv(config, iter_tensors(weight_files(directory), copy=copy), dtype=dtype,
                              device=device, source=str(directory))
    config = read_config(directory)
    files = weight_files(directory)
    if config.quantization:  # our own: rebuild the quantized layers, then fill them
        from minicpm.quantization.quantize import load_quantized

        # codes read into memory of their own: they are repacked for the kernels anyway
        return load_quantized(config, iter_tensors(files, copy=_quantized_part()), dtype=dtype, device=device,
                              source=str(directory))
    return build_model(config, iter_tensors(files), dtype=dtype, device=device, source=str(directory))


def _quantized_part() -> Callable[[str], bool]:
    from minicpm.quantization.quantize import is_quantized_part

    return is_quantized_part


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
    check_writable(out_dir, overwrite)
    config = config or model.config
    state = state_dict if state_dict is not None else checkpoint_state_dict(model)
    target = resolve_dtype(dtype)
    if target is not None:
        state = {k: v.to(target) for k, v in state.items()}
    # the first float tensor: a quantized checkpoint may begin with integer codes
    stored = next((v.dtype for v in state.values() if v.is_floating_point()), next(iter(state.values())).dtype)
    config = config.replace(torch_dtype=str(stored).removeprefix("torch."))
    with atomic_dir(out_dir) as tmp:
        write_checkpoint_files(config, tokenizer, tmp)
        _write_shards(state, tmp, max_shard_bytes)
    return out_dir


def check_writable(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MiniCPMError(f"{out_dir} already exists and is not empty (pass overwrite=True / --force)")


def write_checkpoint_files(config: MiniCPMConfig, tokenizer, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files (a streaming writer's part)."""
    config.save(out / "config.json")
    _write_generation_config(config, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: a tied head is not written twice."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        head = "llm.lm_head.weight" if model.config.model_type == "minicpmv" else "lm_head.weight"
        state.pop(head, None)
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
    names = shard_file_names(len(shards))
    for file, shard in zip(names, shards):
        save_file(shard, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        write_index(out, [(file, list(shard), sum(t.numel() * t.element_size() for t in shard.values()))
                          for file, shard in zip(names, shards)])


def shard_file_names(count: int) -> list[str]:
    """The weight file names of a checkpoint in `count` shards, as transformers names them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(out: Path, shards: list[tuple[str, list[str], int]]) -> None:
    """model.safetensors.index.json for shards given as (file, tensor names, bytes)."""
    weight_map = {name: file for file, names, _ in shards for name in names}
    index = {"metadata": {"total_size": sum(size for _, _, size in shards)}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Safetensors shards written one tensor at a time, split as `_write_shards` splits them.

    save_file needs a whole shard in memory; here each tensor's bytes go to a scratch file as they
    come, and closing a shard writes its header and copies the bytes over in safetensors' own
    order (widest dtype first, then by name, so every tensor stays aligned) a chunk at a time.
    Memory: one tensor and one chunk. Write into a directory from `atomic_dir`.
    """

    CHUNK = 64 * 2**20

    def __init__(self, out: Path, max_shard_bytes: int = 2 * 1024**3):
        self.out, self.max_shard_bytes = out, max_shard_bytes
        self.done: list[tuple[Path, list[str], int]] = []  # (written shard, names, bytes)
        self.names: set[str] = set()
        self._start()

    def _start(self) -> None:
        # open across add() calls; closed by _finish_shard or abort
        self._scratch = open(self.out / f".shard-{len(self.done) + 1}.data", "w+b")  # noqa: SIM115
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name: dtype, shape, offset, bytes
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._size + nbytes > self.max_shard_bytes:
            self._finish_shard()
            self._start()
        if nbytes:
            self._scratch.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = (_SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), self._size, nbytes)
        self._size += nbytes
        self.names.add(name)

    def _finish_shard(self) -> None:
        order = sorted(self._entries, key=lambda n: (-_itemsize(self._entries[n][0]), n))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in order:
            dtype, shape, _, nbytes = self._entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors pads it
        path = self.out / f".shard-{len(self.done) + 1}.safetensors"
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in order:
                _, _, start, nbytes = self._entries[name]
                self._scratch.seek(start)
                while nbytes:
                    chunk = self._scratch.read(min(nbytes, self.CHUNK))
                    f.write(chunk)
                    nbytes -= len(chunk)
        self._scratch.close()
        os.unlink(self._scratch.name)
        self.done.append((path, list(self._entries), self._size))

    def close(self) -> list[Path]:
        """Finish the last shard and name the files as save_pretrained does (index if several)."""
        self._finish_shard()
        names = shard_file_names(len(self.done))
        for (path, _, _), file in zip(self.done, names):
            os.replace(path, self.out / file)
        if len(self.done) > 1:
            write_index(self.out, [(file, tensors, size) for (_, tensors, size), file in zip(self.done, names)])
        return [self.out / file for file in names]

    def abort(self) -> None:
        if not self._scratch.closed:
            self._scratch.close()


def _itemsize(safetensors_dtype: str) -> int:
    return next(torch.empty(0, dtype=d).element_size() for d, n in _SAFETENSORS_DTYPES.items()
                if n == safetensors_dtype)
