"""Which published quantization a checkpoint directory holds, from its config files.

GPTQ settings live in config.json's `quantization_config` (transformers, optimum, GPTQModel) or in
`quantize_config.json` (AutoGPTQ; GPTQModel also reads `quant_config.json`); AutoAWQ and
bitsandbytes write `quantization_config`. config.json wins when both exist, as in transformers
and vLLM. Flags that the tensors themselves settle are not trusted: GPTQ's `desc_act` (the
official MiniCPM-2B-sft-int4 says false in one file and true in the other) gives way to the
stored g_idx, and group sizes are checked against the tensor shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import CheckpointError

GPTQ_FILES = ("quantize_config.json", "quant_config.json")
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 stores zero points minus one; v2 as they are
METHODS = ("gptq", "awq", "bitsandbytes")


@dataclass(frozen=True)
class Published:
    """A published quantization: method, bits, asked group (None: one group per row), and for
    GPTQ the checkpoint format. `raw` is the settings dict as read."""

    method: str
    bits: int
    group_size: int | None
    checkpoint_format: str = ""
    sym: bool | None = None
    desc_act: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def zero_offset(self) -> int:
        """What GPTQ v1 subtracted from every zero point before packing (v2 and AWQ: nothing)."""
        return 1 if self.method == "gptq" and self.checkpoint_format == "gptq" else 0

    def describe(self) -> str:
        group = "per row" if self.group_size is None else f"group {self.group_size}"
        if self.method == "bitsandbytes":
            return f"bitsandbytes {self.raw.get('bnb_4bit_quant_type', 'nf4')} 4-bit"
        fmt = f" ({self.checkpoint_format})" if self.method == "gptq" else " (GEMM)"
        sym = "" if self.sym is None else (", sym" if self.sym else ", asym")
        return f"{self.method}{fmt} {self.bits}-bit, {group}{sym}"


def read_published(directory: Path, extra: dict[str, Any]) -> Published | None:
    """The published quantization of a checkpoint directory (config.json's extra keys given),
    or None for a float checkpoint (or one of our own). Unsupported variants are refused here,
    by name, before any tensor is read."""
    settings, where = _settings(directory, extra)
    if settings is None:
        return None
    method = settings.get("quant_method")
    if method is None and where != "config.json":
        method = "gptq"  # AutoGPTQ's quantize_config.json predates the key
    if method is None and (settings.get("load_in_4bit") or settings.get("load_in_8bit")):
        method = "bitsandbytes"
    method = str(method).lower()
    if method not in METHODS:
        raise CheckpointError(f"{directory}: unknown quant_method {method!r} in {where}; this version loads "
                              "gptq, awq and bitsandbytes 4-bit checkpoints")
    return {"gptq": _gptq, "awq": _awq, "bitsandbytes": _bnb}[method](settings, f"{directory}/{where}")


def _settings(directory: Path, extra: dict[str, Any]) -> tuple[dict | None, str]:
    settings = extra.get("quantization_config")
    if settings is not None:
        if not isinstance(settings, dict):
            raise CheckpointError(f"{directory}/config.json: quantization_config is not an object")
        return settings, "config.json"
    for name in GPTQ_FILES:
        path = directory / name
        if path.exists():
            try:
                settings = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(settings, dict):
                raise CheckpointError(f"{path} does not hold a JSON object")
            return settings, name
    return None, ""


def _int(settings: dict, key: str, where: str, default: Any = None) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _group(settings: dict, where: str) -> int | None:
    group = _int(settings, "group_size", where, -1)
    if group == -1:
        return None
    if group <= 0:
        raise CheckpointError(f"{where}: group_size must be positive or -1, got {group}")
    return group


def _gptq(settings: dict, where: str) -> Published:
    bits = _int(settings, "bits", where)
    if bits not in (4, 8):
        raise CheckpointError(f"{where}: GPTQ {bits}-bit weights are not supported; our kernels run 4 and 8 bits")
    fmt = settings.get("checkpoint_format") or settings.get("format") or "gptq"
    if settings.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in GPTQ_FORMATS:
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (gptq and gptq_v2 are)")
    if settings.get("dynamic"):
        raise CheckpointError(f"{where}: GPTQModel 'dynamic' per-layer overrides are not supported "
                              f"({', '.join(map(str, settings['dynamic']))}); export without them")
    if settings.get("rotation"):  # its down_proj weights hold a Hadamard transform that x must get too
        raise CheckpointError(f"{where}: GPTQModel rotation {settings['rotation']!r} is not supported (its down_proj "
                              "needs an online Hadamard transform at inference); quantize without rotation")
    pack = str(settings.get("pack_dtype") or "int32").removeprefix("torch.")
    if pack != "int32":
        raise CheckpointError(f"{where}: GPTQModel pack_dtype {pack!r} is not supported; export with "
                              "pack_dtype int32 (the GPTQ format's own)")
    return Published("gptq", bits, _group(settings, where), fmt, settings.get("sym"), settings.get("desc_act"),
                     settings)


def _awq(settings: dict, where: str) -> Published:
    bits = _int(settings, "bits", where, settings.get("w_bit", 4))
    if bits != 4:
        raise CheckpointError(f"{where}: AWQ {bits}-bit weights are not supported (4-bit GEMM is)")
    version = str(settings.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"{where}: AWQ version {version!r} is not supported (GEMM is)")
    if settings.get("zero_point", True) is not True:
        raise CheckpointError(f"{where}: AWQ without zero points (zero_point false) is not supported")
    group = _group({"group_size": settings.get("group_size", settings.get("q_group_size", 128))}, where)
    if group is None:
        raise CheckpointError(f"{where}: AWQ group_size -1 is not supported")
    return Published("awq", 4, group, "gemm", False, False, settings)


def _bnb(settings: dict, where: str) -> Published:
    if settings.get("load_in_8bit"):
        raise CheckpointError(f"{where}: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; "
                              "4-bit nf4/fp4 ones are")
    if not settings.get("load_in_4bit"):
        raise CheckpointError(f"{where}: bitsandbytes settings with neither load_in_4bit nor load_in_8bit")
    kind = str(settings.get("bnb_4bit_quant_type", "nf4")).lower()
    if kind not in ("nf4", "fp4"):
        raise CheckpointError(f"{where}: bitsandbytes quant type {kind!r} is not supported (nf4, fp4 are)")
    return Published("bitsandbytes", 4, None, kind, raw=settings)
