"""Weight-only quantization (int8 per channel, int4 group-wise) as a module swap.

    from minicpm.quantization import quantize_model
    quantize_model(model, bits=4, group_size=128, head="int8")   # in place
    save_pretrained(model, tokenizer, "out")                     # config.json records it

Checkpoint layout of a quantized Linear `X` (portable; packed for the CPU kernels at load):
    X.qweight  int8 [N, K]                      (8 bits)   w = qweight * scales[:, None]
               uint8 [N, K/2], even k low nibble (4 bits)   w = (q - zeros) * scales, per group
    X.scales   [N] (8 bits) or [N, K/G] (4 bits), model dtype
    X.zeros    [N, K/G] zero points in code units, floats (4 bits only; integer for GPTQ/AWQ)
    X.bias     if the layer has one

The tied embedding of a model with an int8 head is not stored (`"embedding": "head"` in the
record): lookups read the head's table. Records without the key store it ("float").

`quantize_checkpoint` streams: tensors are read one at a time from the memory-mapped source
(safetensors, .bin or GGUF), quantized as they come and written to size-bounded shards, so
quantizing never holds the model, let alone an fp32 one.
"""

from minicpm.quantization.embedding import QuantizedEmbedding
from minicpm.quantization.linear import QuantizedLinear
from minicpm.quantization.quantize import (
    dequantize_model,
    load_quantized,
    make_spec,
    quantize_model,
    quantize_tensors,
)

__all__ = ["QuantizedEmbedding", "QuantizedLinear", "dequantize_model", "load_quantized", "make_spec", "quantize_checkpoint",
           "quantize_model", "quantize_tensors"]


def quantize_checkpoint(src, out, bits: int = 4, group_size: int = 128, head: str = "int8",
                        overwrite: bool = False, progress: bool = True, embedding: str = "head",
                        max_shard_bytes: int = 2 * 1024**3):
    """Quantize checkpoint `src` (directory, .gguf file or hub id) into directory `out`, streaming.

    The result is what `quantize_model(minicpm.load(src)) + save_pretrained` would write, tensor
    for tensor, without building the model. `out` appears only when complete (temp dir + rename).
    """
    from pathlib import Path

    from tqdm import tqdm

    from minicpm.errors import MiniCPMError
    from minicpm.files import atomic_dir
    from minicpm.formats.hf import ShardWriter, check_writable, write_checkpoint_files

    out = Path(out)
    check_writable(out, overwrite)  # fail before the slow part
    spec = make_spec(bits, group_size, head, embedding)
    config, tensors, tokenizer, dtype, source = _open_source(src)
    # the bar counts source tensors (a quantized Linear writes 2-4 tensors for one read)
    tensors = tqdm(tensors, desc="quantizing", unit="tensor", total=_count_tensors(config), disable=not progress)
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


def _open_source(src):
    """(config, lazy (name, tensor) pairs, tokenizer or None, dtype to load in, source name)."""
    from minicpm.errors import CheckpointError
    from minicpm.formats.hf import iter_tensors, read_config, weight_files
    from minicpm.loading import locate
    from minicpm.tokenizer import Tokenizer

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
    # every tensor read into memory of its own, used, dropped: no mapping keeps them resident
    return config, iter_tensors(weight_files(path), copy=lambda name: True), tokenizer, None, str(path)


def _count_tensors(config) -> int:
    """Source tensors expected (the progress bar's total)."""
    import torch

    from minicpm.formats.hf import checkpoint_state_dict
    from minicpm.model import MiniCPMForCausalLM

    with torch.device("meta"):
        return len(checkpoint_state_dict(MiniCPMForCausalLM(config)))
