"""The model a recipe trains, and its tokenizer: a checkpoint to continue from or a fresh model
from `model.config` (initialised the muP way), made trainable as `train.method` says (all
weights, LoRA, or QLoRA over a quantized base)."""

from __future__ import annotations

from pathlib import Path

import torch

from minicpm.errors import MiniCPMError
from minicpm.training.recipe import Recipe


def build_trainable_model(recipe: Recipe, device: torch.device):
    """(model, tokenizer) in training mode, with only what `train.method` trains requiring grad."""
    from minicpm.formats import load_checkpoint

    m = recipe.model
    # fine-tuning without model.path starts from the default model
    if m.path is not None or recipe.kind != "pretrain":
        model, tokenizer = load_checkpoint(m.path, dtype=m.dtype, device=device)
        if tokenizer is None:
            raise MiniCPMError(f"{m.path} has no tokenizer files; training needs one")
    else:
        tokenizer = load_tokenizer(m.tokenizer)
        model = fresh_model(recipe, tokenizer, device)
    method = recipe.train.method
    if getattr(model.config, "quantization", None) and method == "full":
        raise MiniCPMError(f"{m.path} is quantized: fine-tune it with train.method=lora (QLoRA)")
    model.requires_grad_(method == "full")  # loading makes an inference model: nothing trainable
    if method in ("lora", "qlora"):
        _add_adapters(model, recipe)
        if recipe.train.precision == "bf16":
            _frozen_linears_in_bf16(model)
    model.gradient_checkpointing = bool(recipe.train.activation_checkpointing)
    model.train()
    return model, tokenizer


def _add_adapters(model, recipe: Recipe) -> None:
    """LoRA adapters on the recipe's targets; QLoRA quantizes a float base first."""
    from minicpm.training.lora import LoraSpec, add_lora

    if recipe.train.method == "qlora" and not model.config.quantization:
        from minicpm.quantization import quantize_model

        quantize_model(model, bits=recipe.lora.quant_bits, group_size=recipe.lora.quant_group_size,
                       head="bf16")
    spec = LoraSpec(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                    targets=recipe.lora.targets)
    add_lora(model, spec, seed=recipe.seed)


def _frozen_linears_in_bf16(model) -> None:
    """The frozen Linear weights of the decoder layers in bf16. bf16 autocast multiplies in
    bf16 anyway, so the results are the same, but an fp32 weight is cast anew at every forward
    pass and the copy kept for the backward pass: the whole base once more per micro-batch.
    Norms, the embedding and the head keep their dtype (the residual stream stays fp32)."""
    for module in model.model.layers.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and not weight.requires_grad and weight.dtype == torch.float32:
            module.to(torch.bfloat16)


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
