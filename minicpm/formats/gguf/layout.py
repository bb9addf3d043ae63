"""How a Hugging Face tensor becomes a llama.cpp tensor: names, rotary row order, stacked experts.

* Names: `blk.{i}.attn_q.weight` <-> `model.layers.{i}.self_attn.q_proj.weight` etc. (tables
  below). Tied models store no `output.weight`; llama.cpp then reuses `token_embd.weight`.
* Rotary layout: llama.cpp rotates adjacent pairs (RoPE type NORM), Hugging Face rotates halves.
  The converter therefore reorders the rows of q_proj/k_proj within every head: GGUF row 2j+t is
  HF row t*(head_dim/2)+j. Reading undoes that, writing applies it.
* Experts: llama.cpp stacks the experts of a layer into one 3-D tensor `ffn_{gate,up,down}_exps`
  [n_expert, out, in]; HF keeps `mlp.experts.{e}.{w1,w3,w2}` separately.
"""

from __future__ import annotations

import functools
import re

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError

__all__ = ["TENSOR_NAMES", "EXPERT_NAMES", "gguf_to_hf_name", "hf_to_gguf_name",
           "expert_template", "interleave_rope_rows", "deinterleave_rope_rows", "rope_heads"]

# Tensor names: GGUF template -> Hugging Face template; "{}" is the layer number. Each entry
# covers both `.weight` and `.bias`.
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
    "blk.{}.ffn_gate_inp": "model.layers.{}.mlp.gate",  # MoE router [n_expert, d]
    # Old GGUFs store experts one by one: blk.{layer}.ffn_gate.{expert}.weight.
    "blk.{}.ffn_gate.{}": "model.layers.{}.mlp.experts.{}.w1",
    "blk.{}.ffn_up.{}": "model.layers.{}.mlp.experts.{}.w3",
    "blk.{}.ffn_down.{}": "model.layers.{}.mlp.experts.{}.w2",
}
# Stacked experts: one GGUF tensor [n_expert, out, in] <-> n_expert HF tensors (layer, expert).
EXPERT_NAMES = {
    "blk.{}.ffn_gate_exps.weight": "model.layers.{}.mlp.experts.{}.w1.weight",
    "blk.{}.ffn_up_exps.weight": "model.layers.{}.mlp.experts.{}.w3.weight",
    "blk.{}.ffn_down_exps.weight": "model.layers.{}.mlp.experts.{}.w2.weight",
}
# Tensors whose rows llama.cpp interleaves for its rotary layout, with the head count to use.
_ROPE_PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------
@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


@functools.cache
def _gguf_to_hf_patterns() -> list[tuple[re.Pattern[str], str]]:
    return [(_template_regex(g + suffix), h + suffix)
            for g, h in TENSOR_NAMES.items() for suffix in (".weight", ".bias")]


@functools.cache
def _hf_to_gguf_patterns() -> list[tuple[re.Pattern[str], str]]:
    return [(_template_regex(h + suffix), g + suffix)
            for g, h in TENSOR_NAMES.items() for suffix in (".weight", ".bias")]


def _rename(name: str, patterns: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in patterns:
        match = pattern.fullmatch(name)
        if match:
            return target.format(*match.groups())
    return None


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None if unknown)."""
    return _rename(name, _gguf_to_hf_patterns())


def hf_to_gguf_name(name: str) -> str | None:
    return _rename(name, _hf_to_gguf_patterns())


def expert_template(name: str) -> tuple[str, int] | None:
    """(HF template, layer) for a stacked expert tensor name."""
    for template, hf in EXPERT_NAMES.items():
        match = _template_regex(template).fullmatch(name)
        if match:
            return hf, int(match.group(1))
    return None


# ------------------------------------------------------------------------------------------------
# Rotary row order
# ------------------------------------------------------------------------------------------------
def interleave_rope_rows(w, n_heads: int):
    """HF "rotate-half" rows -> llama.cpp adjacent pairs: per head, new row 2j+t = old t*(D/2)+j.
    `w`: a torch tensor or a numpy array (the torch-free runtime reads GGUF too)."""
    half = _half_head(w, n_heads)
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def deinterleave_rope_rows(w, n_heads: int):
    """Inverse of `interleave_rope_rows`."""
    half = _half_head(w, n_heads)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _half_head(w, n_heads: int) -> int:
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rows cannot be split into {n_heads} rotary heads")
    return rows // n_heads // 2


def rope_heads(gguf_name: str, config: MiniCPMConfig) -> int | None:
    """Head count to (de)interleave with, or None if the tensor is not a q/k projection."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _ROPE_PERMUTED:
        return getattr(config, _ROPE_PERMUTED[parts[2]])
    return None
