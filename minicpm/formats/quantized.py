"""Our int4/int8 checkpoint written from any source checkpoint, streaming (`minicpm quantize`).

Tensors are read one at a time from the memory-mapped source (safetensors, .bin or GGUF),
quantized as they come (`minicpm.quantization.quantize_tensors`) and written to size-bounded
shards, so quantizing never holds the model, let alone an fp32 one.

A MiniCPM-V checkpoint: its language model (`llm.*`) is quantized as a text model is; its vision
tower and resampler stay as stored (bf16 as released), or with `vision="int8"` the vision
blocks' Linears become int8 (minicpm.vision.loading.vision_linears). The vision tensors are set
aside memory-mapped while the language model streams by, and written after it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.files import atomic_dir
from minicpm.formats.hf import (
    ShardWriter,
    check_writable,
    checkpoint_state_dict,
    is_vision_checkpoint,
    iter_tensors,
    iter_tensors_ordered,
    read_config,
    weight_files,
    write_checkpoint_files,
)
from minicpm.loading import locate
from minicpm.loading.assemble import config_dtype, resolve_dtype
from minicpm.quantization import make_spec, quantize_tensors
from minicpm.quantization.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, calibration_ids
from minicpm.quantization.layerwise import Settings, calibrated_stream, check_supported, layer_order
from minicpm.quantization.quantize import quantize_linears
from minicpm.tokenizer import Tokenizer
from minicpm.vision import MiniCPMV, MiniCPMVConfig
from minicpm.vision.loading import VISION_PREFIXES, vision_linears

VISION_FORMS = ("bf16", "int8")


def quantize_checkpoint(src, out, bits: int = 4, group_size: int = 128, head: str = "int8",
                        overwrite: bool = False, progress: bool = True, embedding: str = "head",
                        max_shard_bytes: int = 2 * 1024**3, vision: str = "bf16", method: str = "rtn",
                        sym: bool = False, act_order: bool | None = None, mse: bool | None = None,
                        calib: str | None = None, samples: int | None = None, seqlen: int | None = None):
    """Quantize checkpoint `src` (directory, .gguf file or hub id) into directory `out`, streaming.

    rtn: the result is what `quantize_model(minicpm.load(src)) + save_pretrained` would write,
    tensor for tensor, without building the model. gptq/awq: calibrated on `samples` windows of
    `seqlen` tokens of `calib` (quantization/calibration.py), one decoder layer at a time
    (quantization/layerwise.py); GPTQ's `act_order` and `mse` are on unless set False.
    `out` appears only when complete (temp dir + rename).
    """
    out = Path(out)
    check_writable(out, overwrite)  # fail before the slow part
    spec = make_spec(bits, group_size, head, embedding, method)
    if vision not in VISION_FORMS:
        raise MiniCPMError(f"vision must be one of {', '.join(VISION_FORMS)}, got {vision!r}")
    settings = _calibration_settings(spec, sym, act_order, mse, calib, samples, seqlen)
    config, tensors, tokenizer, dtype, source = _open_source(src, by_layer=settings is not None)
    is_v = isinstance(config, MiniCPMVConfig)
    if vision != "bf16" and not is_v:
        raise MiniCPMError(f"{source} has no vision tower (--vision is for MiniCPM-V checkpoints)")
    if is_v and settings is not None:
        raise MiniCPMError(f"{source}: --method {method} is for text models; MiniCPM-V takes --method rtn")
    if (config.llm if is_v else config).quantization:  # before the progress bar starts
        raise MiniCPMError(f"{source} is already quantized")
    if settings is None:
        # the bar counts source tensors (a quantized Linear writes 2-4 tensors for one read)
        tensors = tqdm(tensors, desc="quantizing", unit="tensor", total=_count_tensors(config),
                       disable=not progress)
    else:
        check_supported(config, settings)
        ids = calibration_ids(tokenizer, spec["calibration"]["data"], spec["calibration"]["samples"],
                              spec["calibration"]["seqlen"])
        tensors = calibrated_stream(config, tensors, ids, spec, settings, dtype=dtype, source=source,
                                    progress=progress)
    if is_v:
        config, quantized = quantize_minicpmv(config, tensors, spec, vision, dtype=dtype, source=source)
    else:
        config, quantized = quantize_tensors(config, tensors, spec, dtype=dtype, source=source)
    return write_quantized(out, config, quantized, tokenizer, source, max_shard_bytes)


def write_quantized(out, config, quantized, tokenizer, source: str = "checkpoint",
                    max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Directory `out` from `quantize_tensors`' (config, stream): shards as the stream comes, then
    config.json and the tokenizer (None writes none); it appears only when complete."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        stored = None
        try:
            for name, tensor in quantized:
                if stored is None and tensor.is_floating_point():
                    stored = tensor.dtype  # save_pretrained records the first float tensor's dtype
                writer.add(name, tensor)
            writer.close()
        finally:
            writer.abort()
        if stored is None:
            raise MiniCPMError(f"{source} holds no float tensors")
        write_checkpoint_files(config.replace(torch_dtype=str(stored).removeprefix("torch.")), tokenizer, tmp)
    return out


def _calibration_settings(spec: dict, sym: bool, act_order: bool | None, mse: bool | None, calib: str | None,
                          samples: int | None, seqlen: int | None) -> Settings | None:
    """GPTQ/AWQ settings, recorded in `spec` (None for rtn, which takes none of them). GPTQ's
    act-order and range search default to on: with static groups act-order costs nothing at
    inference, and on SmolLM2 the two took GPTQ's share of RTN's perplexity loss recovered from
    38% to 67% (docs/quantization.md)."""
    method = spec["method"]
    if method == "rtn":
        gptq_only = [flag if value else flag.replace("--", "--no-") for flag, value in
                     (("--act-order", act_order), ("--mse", mse)) if value is not None]
        if gptq_only:
            raise MiniCPMError(f"{gptq_only[0]} is a GPTQ option: drop it, or pass --method gptq")
        given = [flag for flag, value in (("--sym", sym or None), ("--calib", calib), ("--samples", samples),
                                          ("--seqlen", seqlen)) if value is not None]
        if given:
            raise MiniCPMError(f"{', '.join(given)}: only for --method gptq or awq (rtn uses no calibration)")
        return None
    if method == "gptq":
        act_order, mse = act_order is not False, mse is not False
    spec.update(sym=sym, act_order=bool(act_order), static_groups=bool(act_order),
                calibration={"data": calib or "wikitext2",
                             "samples": DEFAULT_SAMPLES if samples is None else samples,
                             "seqlen": DEFAULT_SEQLEN if seqlen is None else seqlen})
    if method == "gptq":
        spec["mse"] = mse
    return Settings(method, spec["bits"], sym, bool(act_order), bool(mse))


def _open_source(src, by_layer: bool = False):
    """(config, lazy (name, tensor) pairs, tokenizer or None, dtype to load in, source name).
    `by_layer`: safetensors read decoder layer by layer (GGUF files are stored that way), so that
    the layer-by-layer pass holds no layer read long before its turn."""
    path = locate(src)  # the same checkpoint `minicpm.load(src)` would open
    if path.is_file():
        from minicpm.formats.gguf import read_gguf

        config, tensors, metadata = read_gguf(path)
        tokenizer_meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
        if "tokenizer.ggml.model" not in tokenizer_meta:
            raise CheckpointError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.* keys)")
        # float32, as load_gguf gives a GGUF model: the same codes as quantizing the loaded model
        return config, tensors, Tokenizer.from_gguf_metadata(tokenizer_meta), "float32", str(path)
    tokenizer = Tokenizer.from_pretrained(path) if Tokenizer.exists(path) else None
    files = weight_files(path)
    if is_vision_checkpoint(path):
        # the decoder's tensors read into memory of their own, used, dropped; the vision ones
        # mapped: they are held until the decoder is done
        copy = lambda name: not name.startswith(VISION_PREFIXES)  # noqa: E731
        return MiniCPMVConfig.from_file(path / "config.json"), iter_tensors(files, copy=copy), \
            tokenizer, None, str(path)
    config = read_config(path)
    if by_layer and all(f.suffix == ".safetensors" for f in files):
        return config, iter_tensors_ordered(files, layer_order), tokenizer, None, str(path)
    # every tensor read into memory of its own, used, dropped: no mapping keeps them resident
    return config, iter_tensors(files, copy=lambda name: True), tokenizer, None, str(path)


def quantize_minicpmv(config: MiniCPMVConfig, named_tensors, spec: dict, vision: str = "bf16",
                      dtype=None, source: str = "checkpoint"):
    """(config with the quantization record, iterator of checkpoint tensors) for a MiniCPM-V
    source: `llm.*` through quantize_tensors, then the vision tensors (checked, cast as `load`
    would, their blocks' Linears int8 if `vision` says so)."""
    shapes = _vision_shapes(config)
    target = resolve_dtype(dtype) or config_dtype(config.llm)
    held: list[tuple[str, torch.Tensor]] = []  # the vision tensors, filled as the decoder's stream is read

    def decoder_tensors():
        unexpected = []
        for name, tensor in named_tensors:
            if name.startswith("llm."):
                yield name.removeprefix("llm."), tensor
            elif name in shapes:
                _check_vision_tensor(name, tensor, shapes[name], source)
                held.append((name, tensor))
            else:
                unexpected.append(name)
        missing = sorted(set(shapes) - {name for name, _ in held})
        for what, names in (("unexpected", sorted(unexpected)), ("missing", missing)):
            if names:
                shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                raise CheckpointError(f"{source}: {len(names)} {what} tensor(s): {shown}")

    llm_config, decoder = quantize_tensors(config.llm, decoder_tensors(), spec, dtype=dtype, source=source)
    chosen = {name: (8, None) for name in vision_linears(config)} if vision == "int8" else {}

    def tensors():
        for name, tensor in decoder:
            yield f"llm.{name}", tensor
        cast = ((name, tensor.to(target or tensor.dtype)) for name, tensor in held)
        yield from quantize_linears(cast, chosen, has_bias=dict.fromkeys(chosen, True))

    record = {**llm_config.quantization, "vision": vision}
    return config.replace(quantization=record), tensors()


def _vision_shapes(config: MiniCPMVConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        state = MiniCPMV(config).state_dict()
    return {name: tuple(t.shape) for name, t in state.items() if name.startswith(VISION_PREFIXES)}


def _check_vision_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{source}: tensor {name} has shape {list(tensor.shape)}, config.json implies {list(shape)}")
    if not tensor.is_floating_point():
        raise CheckpointError(f"{source}: tensor {name} has non-float dtype {tensor.dtype}")


def _count_tensors(config) -> int:
    """Source tensors expected (the progress bar's total)."""
    from minicpm.model import MiniCPMForCausalLM

    with torch.device("meta"):
        model = MiniCPMV(config) if isinstance(config, MiniCPMVConfig) else MiniCPMForCausalLM(config)
        return len(checkpoint_state_dict(model))
