"""The model a recipe trains, and its tokenizer: a checkpoint to continue from or a fresh model
from `model.config` (initialised the muP way), made trainable as `train.method` says (all
weights, LoRA, or QLoRA over a quantized base)."""

from __future__ import annotations

from pathlib import Path

import torch

from minicpm.errors import MiniCPMError
from minicpm.loading.assemble import resolve_dtype
from minicpm.training.recipe import Recipe


def build_trainable_model(recipe: Recipe, device: torch.device):
    """(model, tokenizer) in training mode, with only what `train.method` trains requiring grad."""
    from minicpm.formats import load_checkpoint

    m = recipe.model
    method = recipe.train.method
    as_stored = False
    # fine-tuning without model.path starts from the default model
    if m.path is not None or recipe.kind != "pretrain":
        as_stored = method in ("lora", "qlora") and _float_directory(m.path)
        model, tokenizer = load_checkpoint(m.path, dtype=None if as_stored else m.dtype, device=device)
        if tokenizer is None:
            raise MiniCPMError(f"{m.path} has no tokenizer files; training needs one")
    else:
        tokenizer = load_tokenizer(m.tokenizer)
        model = fresh_model(recipe, tokenizer, device)
    if getattr(model.config, "quantization", None) and method == "full":
        raise MiniCPMError(f"{m.path} is quantized: fine-tune it with train.method=lora (QLoRA)")
    model.requires_grad_(method == "full")  # loading makes an inference model: nothing trainable
    if method in ("lora", "qlora"):
        master = resolve_dtype(m.dtype)
        linears = torch.bfloat16 if recipe.train.precision == "bf16" else master
        if as_stored:  # out of the file mapping first, shard by shard, still 16-bit (QLoRA quantizes them)
            _base_dtypes(model, None, None, own=True)
        _add_adapters(model, recipe)
        # `own` where the first pass did not copy: a float32 checkpoint's norms and embedding
        # (already the master dtype) would otherwise stay views of its file mapping, which keeps
        # every page read while casting the Linears resident (SmolLM2 in fp32: ~400 MB of the peak)
        _base_dtypes(model, master, linears, own=not as_stored)
    model.gradient_checkpointing = bool(recipe.train.activation_checkpointing)
    model.train()
    return model, tokenizer


def _add_adapters(model, recipe: Recipe) -> None:
    """LoRA adapters on the recipe's targets; QLoRA quantizes a float base first."""
    from minicpm.training.lora import LoraSpec, add_lora

    if recipe.train.method == "qlora" and not model.config.quantization:
        from minicpm.quantization import quantize_model

        quantize_model(model, bits=recipe.lora.quant_bits, group_size=recipe.lora.quant_group_size,
                       head="bf16", dtype=resolve_dtype(recipe.model.dtype))
    spec = LoraSpec(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                    targets=recipe.lora.targets)
    add_lora(model, spec, seed=recipe.seed)


def _float_directory(path) -> bool:
    """Whether `path` is a float checkpoint directory stored in 16 bits (not a GGUF file, not
    quantized by us or another tool, not MiniCPM-V), which a LoRA base loads as stored: loading it
    in the fp32 master dtype would first make an fp32 copy of the whole model (MiniCPM-2B: 11 GB)
    only to cast its Linears back to bf16 (`_base_dtypes`)."""
    from minicpm.config import read_config_json
    from minicpm.formats.published import published_of
    from minicpm.loading import locate
    from minicpm.vision.config import is_minicpmv_config

    where = locate(path)
    if not (where / "config.json").is_file():
        return False  # a file (GGUF); or no config, which the loader reports
    raw = read_config_json(where / "config.json")
    return (raw.get("torch_dtype") in ("bfloat16", "float16") and not raw.get("quantization")
            and not is_minicpmv_config(raw) and published_of(where) is None)


def _base_dtypes(model, master: torch.dtype | None, linears: torch.dtype | None, own: bool = False) -> None:
    """The frozen base of LoRA in the dtypes training uses, however it was loaded: the decoder
    layers' frozen Linears in `linears` (bf16 under bf16 autocast, which multiplies in bf16 anyway:
    an fp32 weight would be cast anew at every forward pass and the copy kept for the backward
    pass), every other float weight (norms, embedding, head, a QLoRA layer's bias) in `master`
    (None: either as it is). The same weights as loading in the master dtype and casting the
    Linears, bit for bit: bf16 and fp16 widen to fp32 exactly.

    `own`: a weight loaded as stored may be a view of the checkpoint's memory-mapped file, whose
    pages join the RSS only when first read (the plan's measured "now" would miss them), stay
    resident while any view of the file lives, and change if the file is rewritten during the
    run; one already in its dtype is copied into memory of its own (the others are copied by the
    cast). One tensor at a time, in place: a tied head stays tied."""
    frozen = {id(p) for module in model.model.layers.modules() if isinstance(module, torch.nn.Linear)
              and not module.weight.requires_grad for p in module.parameters()}
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        target = (linears if id(param) in frozen else master) or param.dtype
        if param.dtype != target:
            param.data = param.data.to(target)
        elif own:
            param.data = param.data.clone()


def _frozen_linears_in_bf16(model) -> None:
    """The frozen Linear weights of the decoder layers in bf16, the rest as it is."""
    _base_dtypes(model, None, torch.bfloat16)


def load_tokenizer(path: str):
    """The tokenizer of a tokenizer/checkpoint directory or a .gguf file."""
    from minicpm.loading import locate
    from minicpm.tokenizer import Tokenizer

    if Path(path).is_dir() and Tokenizer.exists(path):  # a tokenizer directory (no model in it)
        return Tokenizer.from_pretrained(path)
    where = locate(path)
    if where.is_file():
        from minicpm.formats.gguf.container import GGUFFile

        meta = GGUFFile(where).metadata
        return Tokenizer.from_gguf_metadata({k: v for k, v in meta.items()
                                             if k.startswith("tokenizer.")})
    if not Tokenizer.exists(where):
        raise MiniCPMError(f"{path} has no tokenizer files")
    return Tokenizer.from_pretrained(where)


def fresh_model(recipe: Recipe, tokenizer, device: torch.device):
    """A new MiniCPM from model.config, initialised the muP way when the config has muP scalings."""
    from minicpm.config import MiniCPMConfig
    from minicpm.loading.assemble import resolve_dtype
    from minicpm.model import MiniCPMForCausalLM
    from minicpm.training.mup import mup_init

    fields = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, **recipe.model.config}
    try:
        config = MiniCPMConfig(**fields)
    except TypeError as exc:
        message = f"recipe: model.config: {exc}".replace("MiniCPMConfig.__init__() ", "")
        raise MiniCPMError(message) from None
    if config.vocab_size < len(tokenizer):
        raise MiniCPMError(f"model.config.vocab_size ({config.vocab_size}) is smaller than the "
                           f"tokenizer's vocabulary ({len(tokenizer)})")
    model = MiniCPMForCausalLM(config).to(dtype=resolve_dtype(recipe.model.dtype), device=device)
    if config.dim_model_base and recipe.optim.mup:
        mup_init(model, seed=recipe.seed)
    return model
