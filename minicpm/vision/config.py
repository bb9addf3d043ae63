"""MiniCPM-V configuration: the language model's config plus the vision tower and slicing fields.

The released config.json (`model_type: minicpmv`) keeps the language model's fields at the top
level, as MiniCPM-2B's do, and names its vision tower only by a timm model name
(`vision_encoder`). The sizes of that tower are the named model's; an optional `vision_config`
object overrides them so that small test checkpoints can exist. `num_hidden_layers` there is
counted as timm counts depth, before `drop_vision_last_layer` removes the last block.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm.config import MiniCPMConfig, read_config_json
from minicpm.errors import ConfigError

MODEL_TYPE = "minicpmv"

# timm's vit_so400m_patch14_siglip_384: width 1152, 27 blocks, 16 heads, MLP int(1152 * 3.7362),
# a learned 27x27 position table (384 / 14 = 27).
SIGLIP_SO400M = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                     intermediate_size=4304, image_size=384, patch_size=14)
VISION_ENCODERS = {
    "vit_so400m_patch14_siglip_384.webli": SIGLIP_SO400M,
    "vit_so400m_patch14_siglip_384": SIGLIP_SO400M,
}

# The MiniCPM-V fields of config.json and their defaults (the released values).
V_DEFAULTS: dict[str, Any] = dict(
    vision_encoder="vit_so400m_patch14_siglip_384.webli", query_num=64, max_slice_nums=9,
    scale_resolution=448, patch_size=14, image_size=448, slice_mode=True,
    drop_vision_last_layer=True, mm_use_im_start_end=True)


@dataclass
class SiglipConfig:
    """The vision tower's sizes, named as in a Hugging Face `vision_config`."""

    hidden_size: int
    num_hidden_layers: int  # timm's depth, before drop_vision_last_layer
    num_attention_heads: int
    intermediate_size: int
    image_size: int  # with patch_size: the learned position table is (image_size // patch_size)^2
    patch_size: int
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class MiniCPMVConfig:
    llm: MiniCPMConfig
    vision: SiglipConfig
    vision_encoder: str = V_DEFAULTS["vision_encoder"]
    query_num: int = 64  # resampler queries: tokens per image or slice
    max_slice_nums: int = 9
    scale_resolution: int = 448  # overview and slices aim at this side squared
    patch_size: int = 14  # slice sizes are multiples of it
    image_size: int = 448  # unused by the forward pass; kept for config.json
    slice_mode: bool = True
    drop_vision_last_layer: bool = True
    has_vision_config: bool = False  # whether config.json carried a `vision_config` override
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # V keys we do not model

    def __post_init__(self) -> None:
        grid = round(self.query_num ** 0.5)
        if grid * grid != self.query_num:
            raise ConfigError(f"query_num {self.query_num} must be a perfect square")
        if self.llm.hidden_size % 128:
            raise ConfigError(f"hidden_size {self.llm.hidden_size} must be a multiple of 128 "
                              "(the resampler has one attention head per 128 channels)")
        if self.vision.num_hidden_layers - self.drop_vision_last_layer < 1:
            raise ConfigError("the vision tower needs at least one block")

    # What generic code (saving, generation) reads from a model's config.
    @property
    def model_type(self) -> str:
        return MODEL_TYPE

    @property
    def architecture(self) -> str:
        return "MiniCPMV"

    @property
    def vision_layers(self) -> int:
        """Blocks the model runs: timm's depth less the dropped last one."""
        return self.vision.num_hidden_layers - int(self.drop_vision_last_layer)

    # What generic code (saving, generation, info) reads from a model's config: the language
    # model's values.
    @property
    def vocab_size(self) -> int:
        return self.llm.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.llm.max_position_embeddings

    @property
    def tie_word_embeddings(self) -> bool:
        return self.llm.tie_word_embeddings

    @property
    def torch_dtype(self) -> str | None:
        return self.llm.torch_dtype

    @property
    def bos_token_id(self) -> int | None:
        return self.llm.bos_token_id

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.llm.eos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        return self.llm.eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self.llm.pad_token_id

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MiniCPMVConfig:
        if not is_minicpmv_config(raw):
            raise ConfigError(f"not a MiniCPM-V config (model_type {raw.get('model_type')!r})")
        v_keys = set(V_DEFAULTS) | {"vision_config"}
        llm_raw = {k: v for k, v in raw.items() if k not in v_keys and k != "architectures"}
        llm = MiniCPMConfig.from_hf({**llm_raw, "model_type": "minicpm"})
        values = {k: raw.get(k, default) for k, default in V_DEFAULTS.items()}
        vision = _vision_sizes(values["vision_encoder"], raw.get("vision_config"))
        extra = {"mm_use_im_start_end": values.pop("mm_use_im_start_end")}
        try:
            return cls(llm=llm, vision=vision, has_vision_config="vision_config" in raw,
                       extra=extra, **values)
        except TypeError as e:
            raise ConfigError(f"config.json has a bad value: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> MiniCPMVConfig:
        return cls.from_hf(read_config_json(path))

    def to_hf(self) -> dict[str, Any]:
        out = self.llm.to_hf()
        out.update(model_type=MODEL_TYPE, architectures=[self.architecture])
        for name in V_DEFAULTS:
            out[name] = getattr(self, name) if name in self.__dataclass_fields__ else self.extra.get(name)
        if self.has_vision_config:
            out["vision_config"] = {k: v for k, v in dataclasses.asdict(self.vision).items()
                                    if k != "layer_norm_eps"}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2, ensure_ascii=False) + "\n")

    def replace(self, **changes: Any) -> MiniCPMVConfig:
        """Fields of this class, or of the language model's config (e.g. torch_dtype)."""
        mine = {k: v for k, v in changes.items() if k in self.__dataclass_fields__}
        theirs = {k: v for k, v in changes.items() if k not in mine}
        llm = self.llm.replace(**theirs) if theirs else self.llm
        return dataclasses.replace(self, llm=llm, **mine)

    def num_parameters(self) -> int:
        """Language model + vision tower + resampler."""
        return self.llm.num_parameters() + self.vision_parameters()

    def vision_parameters(self) -> int:
        v, d, q = self.vision, self.llm.hidden_size, self.query_num
        c, f = v.hidden_size, v.intermediate_size
        block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        tower = (3 * v.patch_size ** 2 * c + c) + v.grid ** 2 * c + self.vision_layers * block + 2 * c
        kv_proj = 0 if c == d else c * d
        resampler = 2 * q * d + kv_proj + (3 * d * d + 3 * d) + (d * d + d) + 6 * d + d * d
        return tower + resampler


def _vision_sizes(encoder: str, override: Any) -> SiglipConfig:
    if override is not None:
        if not isinstance(override, dict):
            raise ConfigError("vision_config must be an object")
        missing = [k for k in SIGLIP_SO400M if override.get(k) is None]
        if missing:
            raise ConfigError(f"vision_config is missing field(s): {', '.join(missing)}")
        sizes = {k: override[k] for k in SIGLIP_SO400M}
    elif encoder in VISION_ENCODERS:
        sizes = VISION_ENCODERS[encoder]
    else:
        raise ConfigError(f"unknown vision_encoder {encoder!r}; known: {', '.join(VISION_ENCODERS)} "
                          "(or give its sizes in a vision_config object)")
    try:
        return SiglipConfig(**sizes)
    except TypeError as e:
        raise ConfigError(f"vision_config has a bad value: {e}") from None


def is_minicpmv_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") == MODEL_TYPE or "MiniCPMV" in (raw.get("architectures") or [])
