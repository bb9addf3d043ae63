"""Our int4/int8 checkpoint written from any source checkpoint, streaming (`minicpm quantize`).

Tensors are read one at a time from the memory-mapped source (safetensors, .bin or GGUF),
quantized as they come (`minicpm.quantization.quantize_tensors`) and written to size-bounded
shards, so quantizing never holds the model, let alone an fp32 one.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.files import atomic_dir
from minicpm.formats.hf import (
    ShardWriter,
    check_writable,
    checkpoint_state_dict,
    iter_tensors,
    iter_tensors_ordered,
    read_config,
    weight_files,
    write_checkpoint_files,
)
from minicpm.loading import locate
from minicpm.quantization import make_spec, quantize_tensors
from minicpm.quantization.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, calibration_ids
from minicpm.quantization.layerwise import Settings, calibrated_stream, check_supported, layer_order
from minicpm.tokenizer import Tokenizer


def quantize_checkpoint(src, out, bits: int = 4, group_size: int = 128, head: str = "int8",
                        overwrite: bool = False, progress: bool = True, embedding: str = "head",
                        max_shard_bytes: int = 2 * 1024**3, method: str = "rtn", sym: bool = False,
                        act_order: bool = False, calib: str | None = None, samples: int | None = None,
                        seqlen: int | None = None):
    """Quantize checkpoint `src` (directory, .gguf file or hub id) into directory `out`, streaming.

    rtn: the result is what `quantize_model(minicpm.load(src)) + save_pretrained` would write,
    tensor for tensor, without building the model. gptq/awq: calibrated on `samples` windows of
    `seqlen` tokens of `calib` (quantization/calibration.py), one decoder layer at a time
    (quantization/layerwise.py). `out` appears only when complete (temp dir + rename).
    """
    out = Path(out)
    check_writable(out, overwrite)  # fail before the slow part
    spec = make_spec(bits, group_size, head, embedding, method)
    settings = _calibration_settings(spec, sym, act_order, calib, samples, seqlen)
    config, tensors, tokenizer, dtype, source = _open_source(src, by_layer=settings is not None)
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
    config, quantized = quantize_tensors(config, tensors, spec, dtype=dtype, source=source)
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


def _calibration_settings(spec: dict, sym: bool, act_order: bool, calib: str | None, samples: int | None,
                          seqlen: int | None) -> Settings | None:
    """GPTQ/AWQ settings, recorded in `spec` (None for rtn, which takes none of them)."""
    method = spec["method"]
    if method == "rtn":
        given = [flag for flag, value in (("--sym", sym or None), ("--act-order", act_order or None),
                                          ("--calib", calib), ("--samples", samples), ("--seqlen", seqlen))
                 if value is not None]
        if given:
            raise MiniCPMError(f"{', '.join(given)}: only for --method gptq or awq (rtn uses no calibration)")
        return None
    spec.update(sym=sym, act_order=act_order, static_groups=act_order,
                calibration={"data": calib or "wikitext2",
                             "samples": DEFAULT_SAMPLES if samples is None else samples,
                             "seqlen": DEFAULT_SEQLEN if seqlen is None else seqlen})
    return Settings(method, spec["bits"], sym, act_order)


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
    config = read_config(path)
    tokenizer = Tokenizer.from_pretrained(path) if Tokenizer.exists(path) else None
    files = weight_files(path)
    if by_layer and all(f.suffix == ".safetensors" for f in files):
        return config, iter_tensors_ordered(files, layer_order), tokenizer, None, str(path)
    # every tensor read into memory of its own, used, dropped: no mapping keeps them resident
    return config, iter_tensors(files, copy=lambda name: True), tokenizer, None, str(path)


def _count_tensors(config) -> int:
    """Source tensors expected (the progress bar's total)."""
    import torch

    from minicpm.model import MiniCPMForCausalLM

    with torch.device("meta"):
        return len(checkpoint_state_dict(MiniCPMForCausalLM(config)))
