"""GGUF, the llama.cpp file format: read it into our model, write it for llama.cpp.

Reading (`read_gguf`, `load_gguf`) memory-maps the file (our own container parser, gguf_file.py:
gguf-py's reader takes seconds on large vocabularies) and converts one tensor at a time (quantized
blocks dequantized to float32, F16/BF16 kept as they are), so a large file is never duplicated in
memory. Writing (`write_gguf`) produces files that llama.cpp runs: architecture `minicpm` for
MiniCPM configs, `llama` for Llama configs.

What differs between the two layouts, and how we map it:

* Names: `blk.{i}.attn_q.weight` <-> `model.layers.{i}.self_attn.q_proj.weight` etc. (tables
  below). Tied models store no `output.weight`; llama.cpp then reuses `token_embd.weight`.
* Rotary layout: llama.cpp rotates adjacent pairs (RoPE type NORM), Hugging Face rotates halves.
  The converter therefore reorders the rows of q_proj/k_proj within every head: GGUF row 2j+t is
  HF row t*(head_dim/2)+j. We undo that when reading and apply it when writing.
* Experts: llama.cpp stacks the experts of a layer into one 3-D tensor `ffn_{gate,up,down}_exps`
  [n_expert, out, in]; HF keeps `mlp.experts.{e}.{w1,w3,w2}` separately.
* muP scalings are stored as the numbers llama.cpp multiplies with, as float32:
  `minicpm.embedding_scale` = scale_emb, `minicpm.residual_scale` = scale_depth / sqrt(L),
  `minicpm.logit_scale` = hidden_size / dim_model_base (llama.cpp multiplies logits by its
  inverse). Reading maps them back to scale_emb, scale_depth = residual_scale * sqrt(L) and
  dim_model_base = hidden_size / logit_scale, choosing the shortest decimal whose derived scale
  rounds to the stored float32 (so 1.4 comes back as 1.4, not 1.3999999). We always write all
  three keys: llama.cpp's fallback for a missing logit_scale multiplies logits instead of dividing.
* Quantized writing: Q8_0/Q4_0/Q5_0 blocks come from gguf-py, the k-quants (Q4_K/Q5_K/Q6_K, which
  gguf-py cannot write) from gguf_quants.py, llama.cpp's reference encoders without an importance
  matrix. `q4_k_m` picks each tensor's type as llama.cpp's Q4_K_M does (`_q4_k_m_type`); on the
  same weights both give the same types and file size and nearly all blocks byte for byte.
* What GGUF cannot say (dynamic-NTK or llama3 rope scaling parameters, eos lists, torch_dtype)
  travels in our own key `hf.config` (the Hugging Face config as JSON). The standard keys stay
  authoritative; `hf.config` only fills gaps. llama.cpp ignores it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, ConfigError
from minicpm.formats.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

__all__ = ["read_gguf", "read_gguf_info", "load_gguf", "write_gguf", "SUPPORTED_ARCHITECTURES",
           "FILE_TYPES"]

SUPPORTED_ARCHITECTURES = ("minicpm", "llama")
HF_CONFIG_KEY = "hf.config"

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

# write_gguf(file_type=...) -> (GGML type of 2-D weights, general.file_type value = llama_ftype)
FILE_TYPES = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "q4_k_m": ("Q4_K", 15),  # llama.cpp's Q4_K_M mix: Q4_K, Q6_K where it matters (see _q4_k_m_type)
    "q6_k": ("Q6_K", 18),
}
# llama.cpp's replacement when a row is not a whole number of blocks (tensor_type_fallback in
# llama-quant.cpp): a 32-value type of about the same precision; F16 if even that does not fit.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, written by llama.cpp's own converter


# ------------------------------------------------------------------------------------------------
# Name mapping
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


# ------------------------------------------------------------------------------------------------
# Rotary row order
# ------------------------------------------------------------------------------------------------
def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF "rotate-half" rows -> llama.cpp adjacent pairs: per head, new row 2j+t = old t*(D/2)+j."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rows cannot be split into {n_heads} rotary heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def deinterleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleave_rope_rows`."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rows cannot be split into {n_heads} rotary heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_heads(gguf_name: str, config: MiniCPMConfig) -> int | None:
    """Head count to (de)interleave with, or None if the tensor is not a q/k projection."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _ROPE_PERMUTED:
        return getattr(config, _ROPE_PERMUTED[parts[2]])
    return None


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def read_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None
              ) -> tuple[MiniCPMConfig, Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Open a GGUF file: (config, lazy (HF name, tensor) pairs in HF layout, metadata).

    The tensors are produced one by one from the memory-mapped file (a single pass): quantized
    ones dequantized to float32, F32/F16/BF16 as stored, each cast to `dtype` if given.
    `metadata` maps every GGUF key to its Python value (tokenizer lists included).
    """
    path = Path(path)
    file, config, metadata = _open_gguf(path)
    return config, _iter_tensors(file, config, dtype), metadata


def read_gguf_info(path: str | os.PathLike) -> tuple[MiniCPMConfig, list[str]]:
    """(config, stored type name of every tensor) without touching tensor data (`inspect`)."""
    file, config, _metadata = _open_gguf(Path(path))
    return config, [t.tensor_type.name for t in file.tensors]


def _open_gguf(path: Path) -> tuple[GGUFFile, MiniCPMConfig, dict[str, Any]]:
    """(file, config, metadata), with every tensor checked to be one we can produce."""
    file = _open_file(path)
    metadata = file.metadata
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = [t.name for t in file.tensors]
    config = config_from_metadata(metadata, tied="output.weight" not in names, source=str(path))
    _check_tensors(file)
    return file, config, metadata


def load_gguf(path: str | os.PathLike, dtype: Any = None, device: Any = None):
    """(model, tokenizer) from a GGUF file; dtype defaults to float32."""
    from minicpm.loading.assemble import build_model
    from minicpm.tokenizer import Tokenizer

    config, tensors, metadata = read_gguf(path)
    tokenizer_meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.model" not in tokenizer_meta:
        raise CheckpointError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.* keys)")
    tokenizer = Tokenizer.from_gguf_metadata(tokenizer_meta)
    model = build_model(config, tensors, dtype=torch.float32 if dtype is None else dtype,
                        device=device, source=str(path))
    return model, tokenizer


def _open_file(path: Path) -> GGUFFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    return GGUFFile(path)  # our own parser: see gguf_file.py for why not gguf.GGUFReader


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
        raw.update(_mup_from_metadata(key, hidden, layers, source))
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


def _mup_from_metadata(key: Callable[..., Any], hidden: int, layers: int,
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


@functools.cache
def _can_dequantize(qtype: int) -> bool:
    """Does gguf-py decode this tensor type? (tried once on one zero block)"""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    kind = T(qtype)
    if kind in (T.F32, T.F16, T.BF16):
        return True
    if kind in (T.I8, T.I16, T.I32, T.I64, T.F64):
        return False  # not model weights
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def _check_tensors(file: GGUFFile) -> None:
    """Fail before building anything: unknown names or block types gguf-py cannot decode."""
    from gguf import GGMLQuantizationType as T

    path = file.path
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            if HF_CONFIG_KEY not in file.metadata:
                raise CheckpointError(
                    f"{path}: tensor rope_freqs.weight (llama3-style rope frequency factors) is "
                    "not supported without the hf.config key that records the rope scaling")
            continue
        if _expert_template(t.name) is None and gguf_to_hf_name(t.name) is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (type {t.tensor_type.name})")
        if not _can_dequantize(int(t.tensor_type)):
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                                  "gguf-py cannot dequantize")
        if file.byte_order == ">" and t.tensor_type not in (T.F32, T.F16):
            # gguf-py's block decoders assume little-endian scales; F32/F16 we can swap.
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                                  "is not supported in a big-endian GGUF file")


def _expert_template(name: str) -> tuple[str, int] | None:
    """(HF template, layer) for a stacked expert tensor name."""
    for template, hf in EXPERT_NAMES.items():
        match = _template_regex(template).fullmatch(name)
        if match:
            return hf, int(match.group(1))
    return None


# ------------------------------------------------------------------------------------------------
# Dequantization of the common block types
# ------------------------------------------------------------------------------------------------
# gguf-py decodes in groups of 16 rows; whole-tensor numpy operations are about 3x faster (SmolLM2's
# Q4_1/Q8_0 weights: 0.7 s -> 0.23 s). Same float32 operations in the same order as gguf-py, so the
# results are bit-identical (tests compare them bit for bit). Block layouts, 32 values each:
#   Q8_0: f16 d, 32 x int8 q          -> d * q
#   Q4_0: f16 d, 16 bytes of nibbles  -> d * (q - 8)
#   Q4_1: f16 d, f16 m, 16 bytes      -> d * q + m
# A nibble byte j holds value j in its low and value j + 16 in its high half.
def _blocks(data: np.ndarray, type_size: int) -> np.ndarray:
    return data.reshape(-1, type_size)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes start..start+2 of every block, as a float32 column."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] values 0..15 (low halves first, then high halves)."""
    out = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[:, :packed.shape[1]])
    np.right_shift(packed, 4, out=out[:, packed.shape[1]:])
    return out


def _unblock(values: np.ndarray, data: np.ndarray, type_size: int) -> np.ndarray:
    """[n_blocks, 32] values -> the tensor's element shape (rows of whole blocks)."""
    return values.reshape(*data.shape[:-1], data.shape[-1] // type_size * values.shape[1])


def _dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 34)
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _half(blocks, 0)
    return _unblock(values, data, 34)


def _dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 18)
    values = (_nibbles(blocks[:, 2:]).view(np.int8) - np.int8(8)).astype(np.float32)
    values *= _half(blocks, 0)
    return _unblock(values, data, 18)


def _dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 20)
    values = _nibbles(blocks[:, 4:]).astype(np.float32)
    values *= _half(blocks, 0)
    values += _half(blocks, 2)  # a separate add, as gguf-py: no fused multiply-add rounding
    return _unblock(values, data, 20)


_FAST_DEQUANTIZERS = {"Q8_0": _dequantize_q8_0, "Q4_0": _dequantize_q4_0,
                      "Q4_1": _dequantize_q4_1}


def _to_torch(data: np.ndarray, qtype) -> torch.Tensor:
    """One tensor's raw data (memory-mapped) -> torch, dequantized if it is a block type."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if qtype in (T.F32, T.F16):
        # A private copy in native byte order (the map is read-only; the file may be big-endian).
        return torch.from_numpy(np.array(data, dtype=data.dtype.newbyteorder("=")))
    if qtype == T.BF16:  # stored as raw bytes; reinterpret rather than widen
        raw = np.array(data).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16)
    fast = _FAST_DEQUANTIZERS.get(qtype.name)
    return torch.from_numpy(fast(data) if fast else dequantize(data, qtype))


def _iter_tensors(file: GGUFFile, config: MiniCPMConfig,
                  dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            continue  # recomputed from the rope scaling in hf.config
        data = file.tensor_data(t)
        stacked = _expert_template(t.name)
        if stacked is not None:
            hf_template, layer = stacked
            for expert in range(data.shape[0]):  # dequantize one expert at a time
                tensor = _to_torch(data[expert], t.tensor_type)
                yield hf_template.format(layer, expert), _cast(tensor, dtype)
            continue
        tensor = _to_torch(data, t.tensor_type)
        heads = _rope_heads(t.name, config)
        if heads is not None:
            tensor = deinterleave_rope_rows(tensor, heads)
        yield gguf_to_hf_name(t.name), _cast(tensor, dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
@dataclass
class _Planned:
    """One tensor of the output file: its GGUF name, element shape, type and how to make it."""
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]


def write_gguf(config: MiniCPMConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
               tokenizer: Any, path: str | os.PathLike, file_type: str = "f16",
               name: str | None = None, progress: bool = False) -> Path:
    """Write a GGUF file llama.cpp runs; returns its path.

    `named_tensors`: HF names (a state dict's items). `tokenizer`: an object with
    `to_gguf_metadata()` or a dict of `tokenizer.*` keys (None writes no tokenizer; llama.cpp
    then refuses the file). `file_type`: f32, f16, bf16, q8_0, q4_0, q4_k_m, q6_k for the 2-D
    weights; 1-D tensors (norms) and the MoE router stay F32. In q4_0 files the output matrix
    (`output.weight`, or `token_embd.weight` when tied) is Q8_0, keeping the head finer as
    llama.cpp's quantizer does; q4_k_m chooses per tensor as llama.cpp's Q4_K_M does (see
    `_q4_k_m_type`). Rows whose length is not a multiple of the block size fall back as in
    llama.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and a 32-value type -> F16.
    `progress`: a progress bar (weights written) on stderr.
    The file appears at `path` only when complete (written to a temporary name, then renamed).
    The tensors are gathered first (the header lists every shape before any data; a state dict
    costs no copy), then converted and written one at a time.
    """
    import gguf
    from tqdm import tqdm

    if file_type not in FILE_TYPES:
        raise ConfigError(f"GGUF file type {file_type!r} is not supported; "
                          f"supported: {', '.join(FILE_TYPES)}")
    _check_writable(config)
    arch = "minicpm" if config.model_type == "minicpm" else "llama"
    tensors = dict(named_tensors)
    plan = _plan_tensors(config, tensors, file_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_model_metadata(writer, config, arch, file_type, name)
        _add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
        for item in plan:
            block, type_size = gguf.GGML_QUANT_SIZES[item.qtype]
            nbytes = int(np.prod(item.shape)) * type_size // block
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), nbytes,
                                   raw_dtype=item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(math.prod(item.shape) for item in plan)
        with tqdm(total=total, desc=f"writing {path.name}", unit="w", unit_scale=True,
                  disable=not progress, leave=False) as bar:
            for item in plan:  # one tensor converted and in memory at a time
                done = bar.n
                writer.write_tensor_data(_encode(item.produce(), item.qtype, bar.update))
                bar.update(math.prod(item.shape) - (bar.n - done))
        writer.flush()
        for handle in writer.fout or []:
            os.fsync(handle.fileno())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_writable(config: MiniCPMConfig) -> None:
    """Refuse what llama.cpp's llama/minicpm graphs would silently compute differently."""
    if config.hidden_act != "silu":
        raise ConfigError(f"llama.cpp's {config.model_type} graph only implements SiLU; "
                          f"hidden_act {config.hidden_act!r} cannot be written to GGUF")
    if config.sliding_window:
        logger.warning("llama.cpp's llama graph has no sliding window; it attends to the whole "
                       "context (sliding_window %s is kept only in hf.config)",
                       config.sliding_window)


def _weight_type(gguf_name: str, shape: tuple[int, ...], config: MiniCPMConfig, file_type: str):
    """The GGML type one tensor is stored as, given the requested file type."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or gguf_name.endswith("ffn_gate_inp.weight"):
        return T.F32  # llama.cpp keeps norms (and the router) in F32
    wanted = FILE_TYPES[file_type][0]
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    if file_type == "q4_k_m":
        wanted = _q4_k_m_type(gguf_name, shape, config)
    elif wanted == "Q4_0" and gguf_name == head:
        wanted = "Q8_0"
    row = shape[-1]
    if row % GGML_QUANT_SIZES[T[wanted]][0] and wanted in _FALLBACK:
        wanted = _FALLBACK[wanted]
    if row % GGML_QUANT_SIZES[T[wanted]][0]:
        return T.F16  # rows must hold whole quantization blocks
    return T[wanted]


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers for a finer type in the _M mixes: the first and last eighth,
    and every third layer in between."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def _q4_k_m_type(gguf_name: str, shape: tuple[int, ...], config: MiniCPMConfig) -> str:
    """The type llama.cpp's `llama_tensor_get_type` (llama-quant.cpp, LLAMA_FTYPE_MOSTLY_Q4_K_M,
    no importance matrix, no overrides) gives a 2-D/3-D weight of a llama/minicpm model, before
    the fallback for rows that are not whole blocks."""
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    if gguf_name == head:  # the output matrix (shared with the embedding when tied)
        return "Q8_0" if shape[-1] % 256 else "Q6_K"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+?)(?:_exps)?\.weight", gguf_name)
    if match is None:
        return "Q4_K"  # the untied token embedding
    layer, role = int(match[1]), match[2]
    n_layers = config.num_hidden_layers
    eight_experts = config.num_experts == 8  # llama.cpp tunes Mixtral-like 8-expert models
    if role == "attn_v":
        if eight_experts:
            return "Q8_0"
        return "Q6_K" if _use_more_bits(layer, n_layers) else "Q4_K"
    if role == "attn_k" and eight_experts:
        return "Q8_0"
    if role == "attn_output" and eight_experts:
        return "Q5_K"
    if role == "ffn_down" and _use_more_bits(layer, n_layers):
        return "Q6_K"
    return "Q4_K"


_EXPERT_PATTERN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w[123])\.weight")
_STACKED_NAME = {hf.split(".")[-2]: g for g, hf in EXPERT_NAMES.items()}  # w1 -> ffn_gate_exps


def _plan_tensors(config: MiniCPMConfig, tensors: dict[str, torch.Tensor],
                  file_type: str) -> list[_Planned]:
    """GGUF tensors in checkpoint order, each with a function that converts it when written."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:
        raise CheckpointError("untied config but no lm_head.weight among the tensors")
    stacks = _expert_stacks(config, tensors)
    plan: list[_Planned] = []
    placed: set[str] = set()
    unknown = []
    for hf_name, tensor in tensors.items():
        match = _EXPERT_PATTERN.fullmatch(hf_name)
        if match:
            gguf_name = _STACKED_NAME[match[3]].format(match[1])
            if gguf_name in placed:
                continue  # one stacked tensor per layer, placed where its first expert was
            placed.add(gguf_name)
            parts = stacks[gguf_name]
            shape, produce = (len(parts), *parts[0].shape), functools.partial(torch.stack, parts)
        else:
            gguf_name = hf_to_gguf_name(hf_name)
            if gguf_name is None:
                unknown.append(hf_name)
                continue
            heads = _rope_heads(gguf_name, config)
            shape = tensor.shape
            if heads is not None:
                produce = functools.partial(interleave_rope_rows, tensor, heads)
            else:
                produce = functools.partial(torch.Tensor.detach, tensor)
        shape = tuple(int(n) for n in shape)
        qtype = _weight_type(gguf_name, shape, config, file_type)
        plan.append(_Planned(gguf_name, shape, qtype, produce))
    if unknown:
        raise CheckpointError(f"no GGUF name for tensor(s): {', '.join(sorted(unknown)[:8])}")
    plan.extend(_rope_freqs_tensor(config))
    return plan


def _expert_stacks(config: MiniCPMConfig, tensors: dict[str, torch.Tensor]
                   ) -> dict[str, list[torch.Tensor]]:
    """Stacked GGUF name -> the per-expert tensors in expert order (all experts required)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, tensor in tensors.items():
        match = _EXPERT_PATTERN.fullmatch(hf_name)
        if match:
            groups.setdefault(_STACKED_NAME[match[3]].format(match[1]), {})[int(match[2])] = tensor
    expected = list(range(config.num_experts))
    for gguf_name, members in groups.items():
        if sorted(members) != expected:
            raise CheckpointError(f"{gguf_name}: experts {sorted(members)} present, config has "
                                  f"num_experts {config.num_experts}")
    return {name: [members[e] for e in expected] for name, members in groups.items()}


def _rope_freqs_tensor(config: MiniCPMConfig) -> list[_Planned]:
    """llama3 rope scaling: llama.cpp divides each rotary frequency by a stored factor."""
    from gguf import GGMLQuantizationType as T

    if not config.rope_scaling or config.rope_scaling.get("rope_type") != "llama3":
        return []
    from minicpm.model import RotaryEmbedding

    def factors() -> torch.Tensor:
        dim = config.head_dim
        plain = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return plain / RotaryEmbedding(config).inv_freq

    return [_Planned("rope_freqs.weight", (config.head_dim // 2,), T.F32, factors)]


def _encode(tensor: torch.Tensor, qtype, on_weights: Callable[[int], Any] | None = None
            ) -> np.ndarray:
    """A tensor as the bytes/array GGUF stores for `qtype`. `on_weights(n)`: progress within a
    k-quant tensor (the slow ones: MiniCPM-2B's embedding alone takes tens of seconds)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from minicpm.formats.gguf_quants import K_QUANT_ENCODERS, QK_K, encode_k_quant

    tensor = tensor.detach().cpu().contiguous()
    if qtype.name in K_QUANT_ENCODERS:  # gguf-py cannot write k-quants
        report = None if on_weights is None else (lambda blocks: on_weights(blocks * QK_K))
        return encode_k_quant(tensor, qtype.name, on_blocks=report)
    if qtype == T.F32:
        return tensor.float().numpy()
    if qtype == T.F16:
        return tensor.to(torch.float16).numpy()
    if qtype == T.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(tensor.float().numpy(), qtype)


def _add_model_metadata(writer, config: MiniCPMConfig, arch: str, file_type: str,
                        name: str | None) -> None:
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


def _add_tokenizer_metadata(writer, tokenizer: Any, vocab_size: int) -> None:
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
