"""Learning-rate schedules: Warmup-Stable-Decay (the MiniCPM paper's) and cosine for comparison.

WSD keeps the peak rate after warmup for as long as training runs (the stable phase) and decays
only at the end, over a short final stretch (~10% of the steps in the paper). Any checkpoint of
the stable phase can therefore be decayed later (`decay_start`): one stable run serves many token
budgets, where each cosine budget needs its own run from the start.

Schedules are plain callables step -> lr (step counts from 0), so they are easy to test, plot
and hand to `torch.optim.lr_scheduler.LambdaLR` through `as_factor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minicpm.errors import MiniCPMError

DECAY_SHAPES = ("exp", "linear", "cosine")


@dataclass(frozen=True)
class WSD:
    """lr(s) = peak * s / warmup while warming up, peak in the stable phase, then from
    `decay_start` over `decay_steps` a decay to peak * final_ratio (and that floor afterwards).

    decay_shape "exp" is the paper's exponential annealing: the rate halves at a constant pace,
    chosen so that it reaches the floor exactly at the end of the decay; "linear" and "cosine"
    are the other shapes people use. decay_start None: stable for ever (a run that will be
    branched later).
    """

    peak_lr: float
    warmup_steps: int
    decay_start: int | None
    decay_steps: int = 0
    final_ratio: float = 0.01
    decay_shape: str = "exp"

    def __post_init__(self) -> None:
        _check_common(self.peak_lr, self.warmup_steps, self.final_ratio)
        if self.decay_shape not in DECAY_SHAPES:
            raise MiniCPMError(f"decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {self.decay_shape!r}")
        if self.decay_start is not None:
            if self.decay_start < self.warmup_steps:
                raise MiniCPMError(f"decay_start ({self.decay_start}) must not come before the end of "
                                   f"warmup ({self.warmup_steps})")
            if self.decay_steps < 1:
                raise MiniCPMError(f"decay_steps must be >= 1 when decay_start is set, got {self.decay_steps}")

    @classmethod
    def for_budget(cls, peak_lr: float, total_steps: int, warmup_steps: int, decay_fraction: float = 0.1,
                   **kwargs) -> WSD:
        """The schedule of a run of `total_steps` that decays over its last `decay_fraction`."""
        if not 0 < decay_fraction <= 1:
            raise MiniCPMError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        decay = max(1, round(total_steps * decay_fraction))
        return cls(peak_lr, warmup_steps, total_steps - decay, decay, **kwargs)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.decay_start is None or step < self.decay_start:
            return self.peak_lr
        progress = min(1.0, (step - self.decay_start + 1) / self.decay_steps)
        return self.peak_lr * _decay(self.decay_shape, progress, self.final_ratio)


@dataclass(frozen=True)
class Cosine:
    """Linear warmup, then a half cosine from peak to peak * final_ratio at total_steps."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    final_ratio: float = 0.1

    def __post_init__(self) -> None:
        _check_common(self.peak_lr, self.warmup_steps, self.final_ratio)
        if self.total_steps <= self.warmup_steps:
            raise MiniCPMError(f"total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps + 1) / (self.total_steps - self.warmup_steps))
        return self.peak_lr * _decay("cosine", progress, self.final_ratio)


def _decay(shape: str, progress: float, final_ratio: float) -> float:
    """Multiplier at `progress` in [0, 1] of a decay from 1 to final_ratio."""
    if shape == "exp":
        return final_ratio ** progress  # 0.5 ** (progress / half-life), half-life = log(0.5)/log(final)
    if shape == "linear":
        return 1.0 - (1.0 - final_ratio) * progress
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_common(peak_lr: float, warmup_steps: int, final_ratio: float) -> None:
    if not peak_lr > 0:
        raise MiniCPMError(f"peak learning rate must be > 0, got {peak_lr}")
    if warmup_steps < 0:
        raise MiniCPMError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 < final_ratio <= 1:
        raise MiniCPMError(f"final_ratio must be in (0, 1], got {final_ratio}")


def as_factor(schedule, base_lr: float):
    """The multiplier LambdaLR expects (lr / base_lr), for optimizers whose groups start at
    base_lr times their own muP scale."""
    return lambda step: schedule(step) / base_lr
