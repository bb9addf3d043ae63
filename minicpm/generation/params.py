"""Sampling settings: `SamplingParams` validates everything a user can pass (CLI, `generate`,
`chat`, the server). No PyTorch here: the torch-free runtime (`minicpm.lean`) takes the same
settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from minicpm.errors import MiniCPMError


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None  # None: as many as the context allows
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (HF rule)
    # OpenAI's, over generated tokens only: logit -= presence * (count > 0) + frequency * count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # token id: added to its logit (OpenAI's, [-100, 100])
    stop_token_ids: list[int] | None = None  # None: the model's end-of-sequence ids
    stop: list[str] = field(default_factory=list)  # stop strings (text level)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}")
        require(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}")
        require(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        for token, bias in (self.logit_bias or {}).items():
            require(isinstance(token, int) and token >= 0, f"logit_bias keys must be token ids >= 0, got {token!r}")
            require(-100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias}")
        if self.max_new_tokens is not None:
            # 0 only scores a prompt (the server's echo with prompt logprobs)
            require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
                   f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before sampling (penalties, logit bias)."""
        return (self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)
                or bool(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Accept our names plus the Hugging Face ones the official API uses (do_sample, ...)."""
        do_sample = kwargs.pop("do_sample", None)
        if "eos_token_id" in kwargs:
            eos = kwargs.pop("eos_token_id")
            kwargs["stop_token_ids"] = [eos] if isinstance(eos, int) else eos
        if kwargs.pop("num_beams", 1) != 1:
            raise MiniCPMError("beam search is not supported (num_beams must be 1)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise MiniCPMError(f"unknown generation argument(s): {', '.join(unknown)}; "
                               f"supported: {', '.join(sorted(names | {'do_sample'}))}")
        params = cls(**kwargs)
        require(params.max_new_tokens != 0, "max_new_tokens must be an integer >= 1 to generate")
        if do_sample is False:
            params.temperature = 0.0
        elif do_sample and params.temperature == 0:
            params.temperature = 1.0  # HF's default temperature when sampling is asked for
        return params


def require(ok: bool, message: str) -> None:
    """A MiniCPMError with `message` unless `ok`."""
    if not ok:
        raise MiniCPMError(message)
