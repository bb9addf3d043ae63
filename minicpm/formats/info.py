"""`minicpm info`: what a checkpoint is, read from its config and file headers (no weights loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from minicpm.config import MiniCPMConfig
from minicpm.loading import resolve

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64"}


def describe(model_arg: str | None) -> dict[str, str]:
    path = resolve(model_arg)
    if path.is_file():
        config, fmt, stored = _gguf_facts(path)
        size = path.stat().st_size
    else:
        config, fmt, stored, size = _hf_facts(path)
    vision = None
    if config.model_type == "minicpmv":  # MiniCPM-V: describe the decoder, then the vision parts
        vision, config = config, config.llm
    n = config.num_parameters() + (vision.vision_parameters() if vision else 0)
    emb = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    out = {
        "path": str(path),
        "format": fmt,
        "architecture": f"{config.architecture} (model_type {config.model_type})",
        "parameters": f"{_count(n)} ({_count(n - emb)} non-embedding)",
        "layers": str(config.num_hidden_layers),
        "hidden / ffn": f"{config.hidden_size} / {config.intermediate_size}",
        "attention heads": f"{config.num_attention_heads} query, {config.num_key_value_heads} key/value, "
                           f"head dim {config.head_dim}",
        "vocabulary": str(config.vocab_size),
        "context": f"{config.max_position_embeddings} tokens",
        "rope": f"theta {config.rope_theta:g}" + (f", scaling {config.rope_scaling}" if config.rope_scaling else ""),
        "activation": config.hidden_act + (f" (threshold {config.hidden_act_param})"
                                           if config.hidden_act == "fatrelu" else ""),
        "head": "tied to the embedding" if config.tie_word_embeddings else "separate lm_head",
        "muP scalings": (f"embedding x{config.embedding_scale:g}, residual x{config.residual_scale:.6g}, "
                         f"logits /{config.logit_scale:g}") if config.has_mup_scaling else "none",
    }
    if config.num_experts:
        out["experts"] = f"{config.num_experts}, {config.num_experts_per_tok} per token"
    if vision:
        out.update(_vision_facts(vision))
    quantization = _quantization(path, config) if path.is_dir() else None
    if quantization:
        out["quantization"] = quantization
    out["stored dtype"] = stored
    out["size on disk"] = _bytes(size)
    out["memory (bf16 / fp32)"] = f"{_bytes(2 * n)} / {_bytes(4 * n)} for the weights"
    return out


def _vision_facts(config) -> dict[str, str]:
    """The MiniCPM-V lines: vision tower, resampler, slicing (a MiniCPMVConfig)."""
    v = config.vision
    return {
        "architecture": "MiniCPMV (model_type minicpmv): SigLIP vision tower + resampler + MiniCPM decoder",
        "vision tower": (f"{config.vision_encoder}: {config.vision_layers} blocks"
                         f"{' (last of ' + str(v.num_hidden_layers) + ' dropped)' if config.drop_vision_last_layer else ''}, "
                         f"width {v.hidden_size}, {v.num_attention_heads} heads, MLP {v.intermediate_size}, "
                         f"patch {v.patch_size}, {v.grid}x{v.grid} position grid resized per image"),
        "vision parameters": _count(config.vision_parameters()),
        "resampler": f"{config.query_num} queries per image or slice, width {config.llm.hidden_size}",
        "image slicing": (f"overview + up to {config.max_slice_nums} slices of about "
                          f"{config.scale_resolution}x{config.scale_resolution}" if config.slice_mode
                          else "off (one image, resized)"),
    }


def _our_record(record: dict) -> str:
    """One line for our own `quantization` record (`minicpm quantize`, or a GGUF model's mix)."""
    if "layers" in record:
        return f"{record.get('method')}, {len(record['layers'])} quantized layers"
    group = f", group {record['group_size']}" if record.get("bits") == 4 else ""
    parts = [f"decoder int{record.get('bits')} (round-to-nearest{group})", f"head {record.get('head', 'int8')}"]
    if record.get("embedding") == "head":
        parts.append("embedding reads the head's table")
    if "vision" in record:
        parts.append("vision blocks int8" if record["vision"] == "int8" else "vision tower as stored")
    return "; ".join(parts)


def _hf_facts(path: Path):
    from safetensors import safe_open

    from minicpm.formats.hf import is_vision_checkpoint, weight_files

    if is_vision_checkpoint(path):
        from minicpm.vision.config import MiniCPMVConfig

        config = MiniCPMVConfig.from_file(path / "config.json")
    else:
        config = MiniCPMConfig.from_file(path / "config.json")
    files = weight_files(path)
    dtypes: Counter[str] = Counter()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    dtypes[_SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype(), "other")] += 1
    kind = "safetensors" if files[0].suffix == ".safetensors" else "pytorch .bin"
    stored = ", ".join(dtypes) if dtypes else (config.torch_dtype or "unknown")
    fmt = f"Hugging Face directory ({kind}, {len(files)} file{'s' * (len(files) > 1)})"
    return config, fmt, stored, sum(f.stat().st_size for f in files)


def _quantization(path: Path, config: MiniCPMConfig) -> str | None:
    """A published format (GPTQ, AWQ, bitsandbytes) and how it loads, or our own record."""
    from minicpm.formats.published import read_published

    published = read_published(path, config.extra)
    if published is not None:
        how = ("dequantized at load (no integer kernel holds its levels)" if published.method == "bitsandbytes"
               else "repacked at load for the int4/int8 kernels")
        return f"{published.describe()}; {how}"
    return _our_record(config.quantization) if config.quantization else None


def _gguf_facts(path: Path) -> tuple[MiniCPMConfig, str, str]:
    from minicpm.formats.gguf import read_gguf_info

    config, tensor_types = read_gguf_info(path)
    stored = ", ".join(f"{t} x{n}" for t, n in Counter(tensor_types).most_common())
    return config, "GGUF (dequantized to float32 when loaded)", stored


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
