"""`minicpm convert`: load from any supported format, write another.

  hf     the MiniCPM format (config model_type "minicpm"; a Llama source gets neutral scalings);
         a MiniCPM-V model in its released layout (the only target it has)
  llama  the "llama format": scalings folded into the weights, loadable by LlamaForCausalLM
  gguf   a llama.cpp file (see minicpm.formats.gguf), and next to it `<stem>.Modelfile` for
         ollama (chat template, stop strings, default sampling; see minicpm.formats.ollama)
  gptq   a GPTQ v1 checkpoint for transformers/optimum and vLLM (minicpm.formats.published.export)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from minicpm.errors import MiniCPMError
from minicpm.formats.hf import checkpoint_state_dict, save_pretrained
from minicpm.formats.llama import to_llama, to_minicpm

TARGETS = ("hf", "llama", "gguf", "gptq")


def convert(src: str, out: str | Path, to: str, dtype: Any = None, gguf_type: str = "f16",
            overwrite: bool = False, progress: bool = False, bits: int | None = None,
            group_size: int | None = None, sym: bool | None = None) -> Path:
    """Write `src` as `to`; `gguf_type` is one of minicpm.formats.gguf.FILE_TYPES (f32, f16,
    bf16, q8_0, q4_0, q4_k_m, q6_k); `progress` shows a bar while the GGUF tensors are written.
    gptq: `bits`/`group_size`/`sym` say how float weights are quantized (default 4, 128, asym);
    a quantized source keeps its own, and `dtype` is that of the float tensors (default fp16)."""
    if to not in TARGETS:
        raise MiniCPMError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    if to != "gptq" and (bits, group_size, sym) != (None, None, None):
        raise MiniCPMError("--bits, --group-size and --sym apply to --to gptq")
    # both before loading what may be gigabytes
    if bits not in (None, 4, 8):
        raise MiniCPMError(f"GPTQ export takes --bits 4 or 8, got --bits {bits}")
    if group_size is not None and group_size != -1 and group_size <= 0:
        raise MiniCPMError(f"GPTQ export takes a positive --group-size, or -1 for one group per row; "
                           f"got --group-size {group_size}")
    if to == "gguf":
        from minicpm.formats.gguf import FILE_TYPES

        if gguf_type not in FILE_TYPES:  # before loading what may be gigabytes
            raise MiniCPMError(f"unknown GGUF type {gguf_type!r}; choose one of "
                               f"{', '.join(FILE_TYPES)}")
    out = Path(out)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise MiniCPMError(f"{out} already exists (pass --force to replace it)")
    from minicpm.formats import load_checkpoint
    from minicpm.formats.hf import is_vision_checkpoint
    from minicpm.loading import locate

    path = locate(src)
    vision = path.is_dir() and is_vision_checkpoint(path)
    if vision and to != "hf":  # before loading, so nothing is written
        raise MiniCPMError(f"{src} is a MiniCPM-V model: the {to} format holds a language model only, no "
                           "vision tower or resampler; use --to hf")
    if to not in ("hf", "gptq") and dtype is None and path.is_file():
        dtype = "float32"  # a GGUF file loads as stored; these writers take float weights
    model, tokenizer = load_checkpoint(src, dtype=dtype, device="cpu")
    if to == "gptq":
        from minicpm.formats.published.export import write_gptq
        from minicpm.loading.assemble import resolve_dtype

        return write_gptq(model, tokenizer, out, bits, group_size, sym, dtype=resolve_dtype(dtype) or torch.float16,
                          overwrite=overwrite)
    if to != "hf" and model.config.quantization:
        raise MiniCPMError(f"{src} is quantized ({model.config.quantization.get('method')}); the {to} "
                           "writer takes float weights: convert the float checkpoint it was made from")
    if to == "hf":  # a MiniCPM-V model as released: llm.*, vpm.*, resampler.*
        return save_pretrained(model, tokenizer, out, config=model.config if vision else to_minicpm(model.config),
                               overwrite=overwrite)
    if to == "llama":
        config, state = to_llama(model.config, checkpoint_state_dict(model))
        return save_pretrained(None, tokenizer, out, config=config, state_dict=state,
                               overwrite=overwrite)
    from minicpm.formats.gguf import write_gguf

    if tokenizer is None:
        raise MiniCPMError(f"{src} has no tokenizer; a GGUF file needs one")
    from minicpm.formats.ollama import write_modelfile

    write_gguf(model.config, checkpoint_state_dict(model).items(), tokenizer, out,
               file_type=gguf_type, progress=progress)
    write_modelfile(out, tokenizer)
    return out
