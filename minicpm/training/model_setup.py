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
    # fine-tuning without model.path starts from the default model
    method = recipe.train.method
    if m.path is not None or recipe.kind != "pretrain":
        as_stored = method in ("lora", "qlora") and _float_directory(m.path)
        model, tokenizer = load_checkpoint(m.path, dtype=None if as_stored else m.dtype, device=device)
        if as_stored:
            _own_memory(model)
        if tokenizer is None:
            raise MiniCPMError(f"{m.path} has no tokenizer files; training needs one")
    else:
        tokenizer = load_tokenizer(m.tokenizer)
        model = fresh_model(recipe, tokenizer, device)
    if getattr(model.config, "quantization", None) and method == "full":
        raise MiniCPMError(f"{m.path} is quantized: fine-tune it with train.method=lora (QLoRA)")
    model.requires_grad_(method == "full")  # loading makes an inference model: nothing trainable
    if method in ("lora", "qlora"):
        _add_adapters(model, recipe)
        _base_dtypes(model, resolve_dtype(m.dtype), bf16_linears=recipe.train.precision == "bf16")
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
    quantized), which a LoRA base loads as stored: loading it in the fp32 master dtype would
    first make an fp32 copy of the whole model (MiniCPM-2B: 11 GB) only to cast its Linears back
    to bf16 (`_base_dtypes`)."""
    import json

    from minicpm.loading import locate

    where = locate(path)
    config = where / "config.json"
    if not config.is_file():
        return False
    raw = json.loads(config.read_text())
    return (raw.get("torch_dtype") in ("bfloat16", "float16") and not raw.get("quantization")
            and not raw.get("quantization_config") and raw.get("model_type") != "minicpmv")


def _own_memory(model) -> None:
    """Weights loaded as stored may be views of the checkpoint's memory-mapped files: their pages
    would join the RSS only when first read (so the plan's measured "now" would miss them), and a
    file rewritten during the run would change the base under it. Each is copied into memory of
    its own, one at a time (the mapping's pages are dropped with the view)."""
    for param in model.parameters():
        param.data = param.data.clone()


def _base_dtypes(model, master: torch.dtype | None, bf16_linears: bool) -> None:
    """The frozen base of LoRA in the dtypes training uses, however it was loaded: the decoder
    layers' frozen Linears in bf16 under bf16 autocast (`_frozen_linears_in_bf16`), every other
    float weight (norms, embedding, head, a QLoRA layer's bias) in the master dtype. The same
    weights as loading in the master dtype and casting the Linears, bit for bit: bf16 and fp16
    widen to fp32 exactly."""
    if master is not None:
        linears = {id(p) for module in model.model.layers.modules() if isinstance(module, torch.nn.Linear)
                   and not module.weight.requires_grad for p in module.parameters()} if bf16_linears else set()
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != master and id(param) not in linears:
                param.data = param.data.to(master)  # in place: a tied head stays tied
    if bf16_linears:
        _frozen_linears_in_bf16(model)


def _frozen_linears_in_bf16(model) -> None:
    """The frozen Linear weights of the decoder layers in bf16. bf16 autocast multiplies in
    bf16 anyway, so the results are the same, but an fp32 weight is cast anew at every forward
    pass and the copy kept for the backward pass: the whole base once more per micro-batch.
    Norms, the embedding and the head keep their dtype (the residual stream stays fp32)."""
    for module in model.model.layers.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and not weight.requires_grad and weight.dtype != torch.bfloat16:
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
