"""Model configuration: one dataclass with Hugging Face field names.

`MiniCPMConfig.from_hf(config_dict)` reads the `config.json` of every text model of the MiniCPM
family (`model_type: minicpm`) and of Llama-architecture models (`llama`, `mistral`), which are
MiniCPM with neutral scalings. The three muP scalings are exposed as derived numbers
(`embedding_scale`, `residual_scale`, `logit_scale`) so the model code reads like the formulas.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("minicpm", "llama", "mistral")
SUPPORTED_ACTIVATIONS = ("silu", "fatrelu", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_NULLABLE = {"num_key_value_heads", "head_dim", "sliding_window", "pad_token_id", "rope_scaling",
             "bos_token_id", "eos_token_id", "dim_model_base", "scale_depth", "torch_dtype"}
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# What the official MiniCPMConfig class assumes when a key is absent (configuration_minicpm.py).
_MINICPM_DEFAULTS = {
    "scale_emb": 1.0,
    "dim_model_base": 1.0,
    "scale_depth": 1.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
}
# ... and what transformers' LlamaConfig assumes.
_LLAMA_DEFAULTS = {
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
}


@dataclass
class MiniCPMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    hidden_act_param: float = 0.0  # FATReLU threshold (MiniCPM-S)
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # muP scalings; neutral values (1, None, None) make a plain Llama.
    scale_emb: float = 1.0
    dim_model_base: float | None = None  # logits are divided by hidden_size / dim_model_base
    scale_depth: float | None = None  # residual branches are multiplied by scale_depth / sqrt(L)
    # Mixture of experts (MiniCPM-MoE); 0 experts = dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.1
    torch_dtype: str | None = None
    model_type: str = "minicpm"
    # Weight-only quantization settings, recorded so that load() can re-apply them.
    quantization: dict[str, Any] | None = None
    # Keys of config.json we do not model, kept so that saving loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

    # --- the three muP scalings, as the model uses them -----------------------------------
    @property
    def embedding_scale(self) -> float:
        return float(self.scale_emb)

    @property
    def residual_scale(self) -> float:
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """Divisor of the final hidden state before the head (d / dim_model_base)."""
        if self.dim_model_base is None:
            return 1.0
        return self.hidden_size / self.dim_model_base

    @property
    def has_mup_scaling(self) -> bool:
        return (self.embedding_scale, self.residual_scale, self.logit_scale) != (1.0, 1.0, 1.0)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @property
    def architecture(self) -> str:
        return "MiniCPMForCausalLM" if self.model_type == "minicpm" else "LlamaForCausalLM"

    # --- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MiniCPMConfig:
        """Build from a config.json dict; unknown keys are kept in `extra`."""
        model_type = raw.get("model_type")
        if model_type is None:
            architectures = raw.get("architectures") or []
            model_type = "minicpm" if "MiniCPMForCausalLM" in architectures else None
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r} (architectures: "
                f"{raw.get('architectures')}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in REQUIRED_FIELDS if raw.get(k) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        defaults = _MINICPM_DEFAULTS if model_type == "minicpm" else _LLAMA_DEFAULTS
        values = {**defaults, **raw}
        values["model_type"] = model_type
        if model_type != "minicpm":  # Llama/Mistral have no muP scalings
            values.update(scale_emb=1.0, dim_model_base=None, scale_depth=None)
        if values.get("hidden_act") == "gelu":
            raise ConfigError("hidden_act 'gelu' is not supported; supported: silu, fatrelu, relu")
        if "num_local_experts" in values and not values.get("num_experts"):
            values["num_experts"] = values["num_local_experts"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # A null in config.json means "use the default", except where None is itself a value.
        known = {k: values[k] for k in names if k in values and (values[k] is not None or k in _NULLABLE)}
        extra = {k: v for k, v in raw.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # a field of the wrong type
            raise ConfigError(f"config.json has a bad value: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that transformers/vLLM/our loader read back identically."""
        out: dict[str, Any] = dict(self.extra)
        if self.model_type != "minicpm":
            out.pop("auto_map", None)  # remote-code pointers make no sense for a Llama config
        for f in dataclasses.fields(self):
            if f.name in ("extra", "quantization"):
                continue
            out[f.name] = getattr(self, f.name)
        out["architectures"] = [self.architecture]
        if self.model_type != "minicpm":
            for k in ("scale_emb", "dim_model_base", "scale_depth", "hidden_act_param"):
                out.pop(k)
            if not self.num_experts:
                out.pop("num_experts")
                out.pop("num_experts_per_tok")
        if self.quantization:
            out["quantization"] = self.quantization
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> MiniCPMConfig:
        return cls.from_hf(read_config_json(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2, ensure_ascii=False) + "\n")

    def replace(self, **changes: Any) -> MiniCPMConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        d, f, n_kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads
        hd = self.head_dim
        attn = d * self.num_attention_heads * hd * 2 + d * n_kv * hd * 2
        mlp = 3 * d * f
        if self.num_experts:
            mlp = mlp * self.num_experts + self.num_experts * d
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else emb
        return self.num_hidden_layers * per_layer + emb + head + d


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A config.json file as a dict, with errors that name the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accept both the old `type` and the newer `rope_type` key; reject what we cannot compute."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return None
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise ConfigError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
    out = dict(scaling)
    out["rope_type"] = kind
    out.setdefault("type", kind)
    return out


# Named shapes of the family (numbers from the released config.json files: the 1B vocabulary is
# 73440, the 128k model's 122760 with max_position_embeddings 65536 and dynamic NTK). Presets build
# seeded random checkpoints for tests and benchmarks; they are never a substitute for a real
# config.json when loading weights.
_2B = dict(vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
           num_attention_heads=36, num_key_value_heads=36, max_position_embeddings=4096,
           scale_emb=12.0, dim_model_base=256.0, scale_depth=1.4, tie_word_embeddings=True)
_1B = dict(_2B, vocab_size=73440, hidden_size=1536, intermediate_size=3840, num_hidden_layers=52,
           num_attention_heads=24, num_key_value_heads=8)
# Tiny shapes for tests: every scaling switched on, so a skipped scaling cannot hide.
_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
             scale_emb=12.0, dim_model_base=16.0, scale_depth=1.4, tie_word_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "minicpm-2b": _2B,
    "minicpm-1b": _1B,
    "minicpm-2b-128k": dict(_2B, vocab_size=122760, max_position_embeddings=65536, rope_theta=1e6,
                            rope_scaling={"type": "dynamic", "factor": 4.0}, tie_word_embeddings=False),
    "minicpm-moe-8x2b": dict(_2B, num_experts=8, num_experts_per_tok=2),
    "minicpm-s-1b": dict(_1B, hidden_act="fatrelu", hidden_act_param=0.03),
    "tiny": _TINY,
    "tiny-gqa": dict(_TINY, num_key_value_heads=2),
}


def preset(name: str, **overrides: Any) -> MiniCPMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return MiniCPMConfig(**{**PRESETS[name], **overrides})
