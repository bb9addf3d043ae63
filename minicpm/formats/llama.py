"""Conversion between the MiniCPM format and the "llama format".

Every muP scaling multiplies the output of a linear map, so it can be folded into that map's
weights exactly (this is how the official *-llama-format checkpoints were made):

    embed_tokens' = scale_emb * embed_tokens
    o_proj', down_proj' = (scale_depth / sqrt(L)) * o_proj, down_proj      (every layer)
    lm_head' = lm_head / (hidden_size / dim_model_base)

A tied head is folded from the *unscaled* embedding, so the result stores both matrices
(tie_word_embeddings false). The reverse direction writes a Llama checkpoint as MiniCPM with
neutral scalings, which the official MiniCPM code runs identically.
"""

from __future__ import annotations

import math

import torch

from minicpm.config import MiniCPMConfig
from minicpm.errors import MiniCPMError


def to_llama(config: MiniCPMConfig, state: dict[str, torch.Tensor]) -> tuple[MiniCPMConfig, dict[str, torch.Tensor]]:
    """Fold the scalings into the weights; returns a Llama config and state dict."""
    if config.num_experts:
        raise MiniCPMError("the llama format has no mixture-of-experts layers; convert MoE models --to hf")
    if config.hidden_act == "fatrelu" and config.hidden_act_param != 0:
        raise MiniCPMError("Llama has no FATReLU activation (threshold "
                           f"{config.hidden_act_param}); convert MiniCPM-S models --to hf")
    residual = config.residual_scale
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor = _scaled(tensor, residual)
        elif name.endswith(("self_attn.o_proj.bias", "mlp.down_proj.bias")):
            tensor = _scaled(tensor, residual)
        elif name == "model.embed_tokens.weight":
            tensor = _scaled(tensor, config.embedding_scale)
        out[name] = tensor
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    out["lm_head.weight"] = _scaled(head, 1.0 / config.logit_scale)
    tie = config.tie_word_embeddings and not config.has_mup_scaling
    if tie:
        del out["lm_head.weight"]
    llama = config.replace(
        model_type="llama", scale_emb=1.0, dim_model_base=None, scale_depth=None,
        tie_word_embeddings=tie, hidden_act="relu" if config.hidden_act == "fatrelu" else config.hidden_act,
        hidden_act_param=0.0, extra={k: v for k, v in config.extra.items() if k != "auto_map"})
    return llama, out


def to_minicpm(config: MiniCPMConfig) -> MiniCPMConfig:
    """A MiniCPM config for a Llama checkpoint: the same weights, neutral scalings."""
    if config.model_type == "minicpm":
        return config
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        raise MiniCPMError("MiniCPM has no sliding-window attention; keep this model in the llama format")
    return config.replace(model_type="minicpm", scale_emb=1.0, dim_model_base=float(config.hidden_size),
                          scale_depth=math.sqrt(config.num_hidden_layers))


def _scaled(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return tensor
    # Scale in fp32 so that bf16 weights are rounded once, not twice.
    return (tensor.float() * factor).to(tensor.dtype)
