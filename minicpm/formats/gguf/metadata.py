"""GGUF key/value metadata <-> our config and tokenizer, in both directions.

* Reading: `config_from_metadata` builds a MiniCPMConfig from the `{arch}.*` and
  `tokenizer.ggml.*` keys.
* Writing: `add_model_metadata` and `add_tokenizer_metadata` put the keys llama.cpp needs into a
  gguf-py `GGUFWriter`.

muP scalings are stored as the numbers llama.cpp multiplies with, as float32:
`minicpm.embedding_scale` = scale_emb, `minicpm.residual_scale` = scale_depth / sqrt(L),
`minicpm.logit_scale` = hidden_size / dim_model_base (llama.cpp multiplies logits by its
inverse). Reading maps them back to scale_emb, scale_depth = residual_scale * sqrt(L) and
dim_model_base = hidden_size / logit_scale, choosing the shortest decimal whose derived scale
rounds to the stored float32 (so 1.4 comes back as 1.4, not 1.3999999). We always write all
three keys: llama.cpp's fallback for a missing logit_scale multiplies logits instead of dividing.

What GGUF cannot say (dynamic-NTK or llama3 rope scaling parameters, eos lists, torch_dtype)
travels in our own key `hf.config` (the Hugging Face config as JSON). The standard keys stay
authoritative; `hf.config` only fills gaps. llama.cpp ignores it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, ConfigError
from minicpm.formats.gguf.file_types import FILE_TYPES
from minicpm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "HF_CONFIG_KEY", "config_from_metadata", "gguf_tokenizer",
           "mup_from_metadata", "add_model_metadata", "add_tokenizer_metadata"]

SUPPORTED_ARCHITECTURES = ("minicpm", "llama")
HF_CONFIG_KEY = "hf.config"
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, written by llama.cpp's own converter


# ------------------------------------------------------------------------------------------------
# Reading: metadata -> config
# ------------------------------------------------------------------------------------------------
def _f32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _undo_scale(stored: float, invert: Callable[[float], float],
                apply: Callable[[float], float]) -> float:
    """A config value x with float32(apply(x)) == stored, preferring the shortest decimal."""
    exact = invert(float(stored))
    for candidate in (_f32(exact), exact):
        if np.float32(apply(candidate)) == np.float32(stored):
            return candidate
    return exact


def config_from_metadata(meta: dict[str, Any], tied: bool, source: str = "GGUF") -> MiniCPMConfig:
    """A MiniCPMConfig from GGUF keys (the `hf.config` key, if any, fills what GGUF cannot say)."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        if full not in meta:
            if required:
                raise CheckpointError(f"{source}: GGUF key {full} is missing")
            return default
        return meta[full]

    hidden = int(key("embedding_length", required=True))
    layers = int(key("block_count", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length") or hidden // heads)
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{source}: rotary embedding on part of the head "
                              f"({key('rope.dimension_count')} of {head_dim}) is not supported")
    raw: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "max_position_embeddings": int(key("context_length", required=True)),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise CheckpointError(f"{source}: GGUF has neither {arch}.vocab_size nor a token list")
    raw["vocab_size"] = int(vocab)
    if key("expert_count"):
        raw["num_experts"] = int(key("expert_count"))
        raw["num_experts_per_tok"] = int(key("expert_used_count", 2))
    for gguf_key, hf_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                             ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                             ("tokenizer.ggml.padding_token_id", "pad_token_id")):
        if gguf_key in meta:
            raw[hf_key] = int(meta[gguf_key])
    if arch == "minicpm":
        raw.update(mup_from_metadata(key, hidden, layers, source))
    scaling = _rope_scaling_from_metadata(key)

    embedded = _embedded_hf_config(meta, source)
    if embedded:
        stop_ids = embedded.get("eos_token_id")
        if isinstance(stop_ids, list) and raw.get("eos_token_id") in stop_ids:
            raw["eos_token_id"] = stop_ids  # keep the full stop list
        if scaling is None and key("rope.scaling.type") in (None, "none"):
            scaling = embedded.get("rope_scaling")  # dynamic NTK / llama3: GGUF cannot say
        raw = {**embedded, **raw}
    raw["rope_scaling"] = scaling
    try:
        return MiniCPMConfig.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def mup_from_metadata(key: Callable[..., Any], hidden: int, layers: int,
                       source: str) -> dict[str, float]:
    """scale_emb / scale_depth / dim_model_base from the three stored multipliers."""
    sqrt_l = math.sqrt(layers)
    # GGUFs from before these keys existed: llama.cpp then hard-coded MiniCPM-2B's values.
    defaults = {"embedding_scale": 12.0, "residual_scale": 1.4 / sqrt_l,
                "logit_scale": hidden / 256.0}
    missing = [name for name in defaults if key(name) is None]
    if missing:
        logger.warning("%s: GGUF lacks minicpm.%s; assuming MiniCPM-2B's scale_emb 12, "
                       "scale_depth 1.4, dim_model_base 256", source, ", minicpm.".join(missing))
    stored = {name: defaults[name] if key(name) is None else key(name) for name in defaults}
    return {
        "scale_emb": _f32(stored["embedding_scale"]),
        "scale_depth": _undo_scale(stored["residual_scale"], lambda r: r * sqrt_l,
                                   lambda s: s / sqrt_l),
        "dim_model_base": _undo_scale(stored["logit_scale"], lambda g: hidden / g,
                                      lambda b: hidden / b),
    }


def _rope_scaling_from_metadata(key: Callable[..., Any]) -> dict[str, Any] | None:
    """HF rope_scaling from `{arch}.rope.scaling.*` (llama.cpp's default type is linear)."""
    factor = key("rope.scaling.factor") or key("rope.scale_linear")
    kind = key("rope.scaling.type") or "linear"
    if kind == "none" or not factor or factor == 1.0:
        return None
    out = {"rope_type": kind, "type": kind, "factor": _f32(factor)}
    if kind != "linear" and key("rope.scaling.original_context_length"):
        out["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
    return out  # e.g. yarn: MiniCPMConfig says whether it can run it


def _embedded_hf_config(meta: dict[str, Any], source: str) -> dict[str, Any]:
    text = meta.get(HF_CONFIG_KEY)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: GGUF key {HF_CONFIG_KEY} is not valid JSON: {e}"
                              ) from None
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------------------------
# Writing: config and tokenizer -> metadata
# ------------------------------------------------------------------------------------------------
def add_model_metadata(writer, config: MiniCPMConfig, arch: str, file_type: str,
                       name: str | None) -> None:
    """The `general.*` and `{arch}.*` keys llama.cpp reads, plus `hf.config`."""
    default_name = "MiniCPM" if arch == "minicpm" else "Llama"
    writer.add_name(name or config.extra.get("_name_or_path") or default_name)
    writer.add_file_type(FILE_TYPES[file_type][1])
    if file_type.startswith("q"):
        writer.add_quantization_version(_QUANTIZATION_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "minicpm":
        writer.add_embedding_scale(config.embedding_scale)
        writer.add_residual_scale(config.residual_scale)
        writer.add_logit_scale(config.logit_scale)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(_rope_scaling_type("linear"))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        # dynamic NTK only changes anything beyond max_position_embeddings; llama3 is carried
        # by rope_freqs.weight. Either way llama.cpp must not see a type it does not know.
        writer.add_rope_scaling_type(_rope_scaling_type("none"))
    writer.add_string(HF_CONFIG_KEY, json.dumps(config.to_hf(), ensure_ascii=False, default=str))


def _rope_scaling_type(name: str):
    from gguf import RopeScalingType

    return RopeScalingType(name)


def add_tokenizer_metadata(writer, tokenizer: Any, vocab_size: int) -> None:
    """The `tokenizer.*` keys, the vocabulary padded to `vocab_size` rows."""
    if tokenizer is None:
        logger.warning("writing a GGUF without tokenizer metadata; llama.cpp will not load it")
        return
    meta = dict(tokenizer if isinstance(tokenizer, dict) else tokenizer.to_gguf_metadata())
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template and "tokenizer.chat_template" not in meta:
        meta["tokenizer.chat_template"] = template
    _pad_vocab(meta, vocab_size)
    for key, value in meta.items():
        if key.startswith("tokenizer.") and value is not None:
            _add_value(writer, key, value)


def _pad_vocab(meta: dict[str, Any], vocab_size: int) -> None:
    """llama.cpp needs one token per embedding row; name the spare rows as its converter does."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if len(tokens) > vocab_size:
        raise ConfigError(f"tokenizer has {len(tokens)} tokens, the model only {vocab_size} rows")
    extra = vocab_size - len(tokens)
    if not extra:
        return
    padding = {"tokenizer.ggml.tokens": [f"[PAD{i}]" for i in range(len(tokens), vocab_size)],
               "tokenizer.ggml.scores": [0.0] * extra,
               "tokenizer.ggml.token_type": [5] * extra}  # 5 = llama.cpp's "unused" token type
    for key, more in padding.items():
        if key in meta:
            meta[key] = list(meta[key]) + more


def _add_value(writer, key: str, value: Any) -> None:
    """Store a Python value with the GGUF type llama.cpp expects (token ids are uint32)."""
    from gguf import GGUFValueType

    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int) and value >= 0:
        writer.add_uint32(key, value)
    elif isinstance(value, int):
        writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        values = [float(v) for v in value] if key.endswith("scores") else list(value)
        if values:
            sub = GGUFValueType.get_type(values[0])
            writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=sub)
    else:
        raise ConfigError(f"tokenizer metadata {key} has unsupported type {type(value).__name__}")


def gguf_tokenizer(metadata: dict[str, Any], path) -> Tokenizer:
    """The Tokenizer a GGUF file's tokenizer.* keys describe (CheckpointError if it has none)."""
    tokenizer_meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.model" not in tokenizer_meta:
        raise CheckpointError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.* keys)")
    return Tokenizer.from_gguf_metadata(tokenizer_meta)
