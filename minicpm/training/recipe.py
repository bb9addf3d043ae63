"""Training recipes: nested dataclasses read from YAML, with dotted `key=value` overrides.

    minicpm train pretrain --recipe recipes/pretrain-tiny.yaml optim.lr=0.02 train.steps=400

A recipe is complete and typed: an unknown key or a value of the wrong type is an error naming
the key, and the run directory keeps the recipe it ran with (recipe.yaml), so every run can be
repeated. Defaults follow the MiniCPM paper (muP, WSD with a 10% exponential decay) for
pretraining and the official fine-tuning scripts for SFT (lr 5e-5, LoRA r 8, alpha 32, dropout
0.1, weight decay 0.01, warmup 100 steps).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minicpm.errors import MiniCPMError

KINDS = ("pretrain", "sft", "dpo")
SHORT_RUN_WARMUP = 0.1  # the fraction of a run its warmup becomes when the set one does not fit


@dataclass
class ModelRecipe:
    # checkpoint to start from (sft/dpo: the base, default SmolLM2-135M-Instruct; pretrain: continue it)
    path: str | None = None
    tokenizer: str | None = None  # pretrain from scratch: a tokenizer or checkpoint directory
    # pretrain from scratch: MiniCPMConfig fields (vocab_size defaults to the tokenizer's)
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # of the weights being trained (master weights)


@dataclass
class DataRecipe:
    train: str | None = None  # pretrain: packed shard directory; sft/dpo: JSON / JSONL file
    valid: str | None = None
    seq_len: int = 256  # pretrain window; sft/dpo: longest example (longer ones are cut)
    pack: bool = False  # sft: several short examples per row of seq_len tokens, each kept to itself
    on_bad: str = "skip"  # sft/dpo records that cannot be used: skip (reported) or error


@dataclass
class TrainRecipe:
    steps: int = 1000  # optimizer steps (the schedule spans them)
    stop_at: int | None = None  # end this session at that step, checkpointed; --resume goes on
    batch_size: int = 8  # sequences per optimizer step, over all processes
    # sequences per forward pass, the rest is gradient accumulation; unset: the most whose
    # activations stay within a budget (memory.py)
    micro_batch_size: int | None = None
    method: str = "full"  # full | lora | qlora (sft/dpo)
    # bf16 autocast (fp32 master weights) | fp32 | auto: bf16 where the hardware multiplies in
    # bf16 (a GPU, AVX-512 BF16, AMX), else fp32
    precision: str = "auto"
    # recompute each layer's activations in the backward pass; unset: when the memory
    # estimate does not fit the memory available
    activation_checkpointing: bool | None = None
    clip_grad_norm: float | None = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8  # micro-batches of the validation data per evaluation
    save_every: int = 500
    keep_checkpoints: int = 2  # the newest N; 0 keeps all
    threads: int | None = None


@dataclass
class OptimRecipe:
    lr: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    mup: bool = True  # hidden matrices learn at lr / (d / d_base) (pretrain from a muP config)


@dataclass
class ScheduleRecipe:
    kind: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # wsd: the last fraction of steps decays (0: stable to the end)
    decay_shape: str = "exp"  # wsd: exp (the paper's) | linear | cosine
    final_ratio: float = 0.01  # lr at the end, as a fraction of the peak
    decay_from: str | None = None  # a stable-phase checkpoint: decay from its step to train.steps


@dataclass
class LoraRecipe:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: str = "all-linear"  # or comma-separated short names: q_proj,v_proj
    quant_bits: int = 4  # qlora: the base's bits
    quant_group_size: int = 64


@dataclass
class DpoRecipe:
    beta: float = 0.1
    reference: str = "model"  # model: frozen copy (full) or adapters off (LoRA) | precomputed


@dataclass
class Recipe:
    kind: str = "pretrain"
    out: str = "runs/run"
    seed: int = 0
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    schedule: ScheduleRecipe = field(default_factory=ScheduleRecipe)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    dpo: DpoRecipe = field(default_factory=DpoRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def accumulation_steps_per_process(self) -> int:
        return self.train.batch_size // (self.train.micro_batch_size or self.train.batch_size)

    def fit_warmup(self) -> str | None:
        """A warmup as long as the run or longer (the default 100 steps in a 6-step trial) becomes
        10% of the run; returns the note to print, or None when nothing changed."""
        s, steps = self.schedule, self.train.steps
        if s.kind == "constant" or s.warmup_steps < steps or steps < 1:
            return None
        asked, s.warmup_steps = s.warmup_steps, int(steps * SHORT_RUN_WARMUP)
        return (f"note: schedule.warmup_steps ({asked}) is not below train.steps ({steps}): warming up "
                f"over {s.warmup_steps} steps ({SHORT_RUN_WARMUP:.0%} of the run); pass "
                f"schedule.warmup_steps=N (0 to {steps - 1}) to choose")

    def fit_precision(self, native_bf16: bool) -> str | None:
        """train.precision=auto becomes bf16 where the device multiplies bf16 natively, else
        fp32; returns the note to print when that is fp32. Without bf16 instructions PyTorch's
        CPU bf16 products are converted in software: a small pretraining step ran 6.5x slower
        under bf16 autocast than in fp32 on an AVX2-only EPYC (853 vs 5,511 tok/s)."""
        if self.train.precision != "auto":
            return None
        self.train.precision = "bf16" if native_bf16 else "fp32"
        if native_bf16:
            return None
        return ("note: train.precision=auto is fp32 here: this device has no bf16 arithmetic "
                "(on a CPU: AVX-512 BF16 or AMX), so bf16 autocast would be slower; "
                "train.precision=bf16 forces it")

    def validate(self, world_size: int = 1) -> Recipe:
        t = self.train
        checks = [
            (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}"),
            (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
            (t.stop_at is None or 1 <= t.stop_at <= t.steps, f"train.stop_at must be in 1..train.steps, got {t.stop_at}"),
            (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
            (t.micro_batch_size is None or t.micro_batch_size >= 1,
             f"train.micro_batch_size must be >= 1 (or unset: chosen to fit), got {t.micro_batch_size}"),
            (t.batch_size % ((t.micro_batch_size or 1) * world_size) == 0,
             f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
             f"({t.micro_batch_size or 1}) x processes ({world_size})"),
            (t.method in ("full", "lora", "qlora"), f"train.method must be full, lora or qlora, got {t.method!r}"),
            (self.kind != "pretrain" or t.method == "full", "pretraining trains all weights: train.method=full"),
            (t.precision in ("auto", "bf16", "fp32"),
             f"train.precision must be auto, bf16 or fp32, got {t.precision!r}"),
            (self.schedule.kind in ("wsd", "cosine", "constant"),
             f"schedule.kind must be wsd, cosine or constant, got {self.schedule.kind!r}"),
            (self.schedule.warmup_steps < t.steps or self.schedule.kind == "constant",
             f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be below train.steps ({t.steps})"),
            (self.data.seq_len >= 2, f"data.seq_len must be >= 2, got {self.data.seq_len}"),
            (not self.data.pack or self.kind == "sft", "data.pack is for sft (pretraining windows are full already)"),
            (self.data.on_bad in ("skip", "error"), f"data.on_bad must be skip or error, got {self.data.on_bad!r}"),
            (self.data.train is not None, "data.train is not set (the training data)"),
            (self.kind != "pretrain" or self.model.path is not None or self.model.tokenizer is not None,
             "pretraining from scratch needs model.tokenizer (or model.path to continue a model)"),
            (self.dpo.reference in ("model", "precomputed"),
             f"dpo.reference must be model or precomputed, got {self.dpo.reference!r}"),
            (t.log_every >= 1 and t.save_every >= 1 and t.eval_every >= 1,
             "train.log_every, eval_every and save_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise MiniCPMError(f"recipe: {message}")
        return self


def default_recipe(kind: str) -> Recipe:
    """The built-in recipe of `kind` (pretrain: paper settings; sft/dpo: official fine-tuning)."""
    if kind not in KINDS:
        raise MiniCPMError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    recipe = Recipe(kind=kind, out=f"runs/{kind}")
    if kind != "pretrain":
        recipe.optim = OptimRecipe(lr=5e-5 if kind == "sft" else 1e-5, weight_decay=0.01, mup=False)
        recipe.schedule = ScheduleRecipe(kind="cosine", warmup_steps=100, final_ratio=0.1)
        recipe.train.method = "lora"
        recipe.data.seq_len = 512
    return recipe


def load_recipe(kind: str, path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Built-in defaults for `kind`, then the YAML file, then `key=value` overrides."""
    values = default_recipe(kind).to_dict()
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise MiniCPMError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise MiniCPMError(f"{path}: a recipe must be a mapping of settings")
        if loaded.get("kind", kind) != kind:
            raise MiniCPMError(f"{path} is a {loaded['kind']} recipe, not {kind}")
        _merge(values, loaded, str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MiniCPMError(f"override {item!r} must look like key=value (e.g. optim.lr=0.01)")
        _set_dotted(values, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return from_dict(Recipe, values, "recipe")


def _merge(into: dict, new: dict, where: str, prefix: str = "") -> None:
    for key, value in new.items():
        if key not in into:
            raise MiniCPMError(f"{where}: unknown setting {prefix}{key} (known: {', '.join(into)})")
        if isinstance(into[key], dict) and isinstance(value, dict) and key != "config":
            _merge(into[key], value, where, f"{prefix}{key}.")
        else:
            into[key] = value


def _set_dotted(values: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise MiniCPMError(f"unknown setting {'.'.join(parts[:i + 1])} in override {key}")
        node = node[part]
    last = parts[-1]
    if last not in node and parts[:-1] != ["model", "config"]:  # model.config.* is free-form
        raise MiniCPMError(f"unknown setting {key} (known under {'.'.join(parts[:-1]) or 'the top'}: "
                           f"{', '.join(node)})")
    node[last] = value


def from_dict(cls, values: dict, where: str):
    """`cls` from a dict, each value checked against the field's type."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        kwargs[f.name] = _coerce(hints[f.name], values[f.name], f"{where}.{f.name}".removeprefix("recipe."))
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MiniCPMError(f"recipe: {key} must be a mapping, got {value!r}")
        return from_dict(hint, value, key)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise MiniCPMError(f"recipe: {key} must be set (got nothing)")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is bool and isinstance(value, bool):
            return value
        if origin is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if origin in (list, dict) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise MiniCPMError(f"recipe: {key} must be {names}, got {value!r}")
