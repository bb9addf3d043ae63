"""Run logs: one JSON record per logged step or evaluation (RUN/log.jsonl), a console line for
each, and a loss-curve PNG (RUN/loss.png) redrawn at every evaluation and at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minicpm.files import atomic_file, write_text
from minicpm.training.profile import format_memory


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True, echo=print):
        self.path = run_dir / "log.jsonl"
        self.enabled, self.echo = enabled, echo

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.echo(format_record(record))

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_record(r: dict[str, Any]) -> str:
    if "memory" in r:
        return format_memory(r["memory"])
    if "eval_loss" in r:
        extra = f" | ppl {r['eval_ppl']:.2f}" if "eval_ppl" in r else ""
        extra += "".join(f" | {k.removeprefix('eval_')} {v:.3f}" for k, v in r.items()
                         if k.startswith("eval_reward"))
        return f"step {r['step']:>6} | eval loss {r['eval_loss']:.4f}{extra}"
    parts = [f"step {r['step']:>6}/{r['steps']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s", f"eta {_duration(r['eta_s'])}",
             f"mem {r['memory_mb']:,.0f} MB"]
    parts += [f"{k.replace('_', ' ')} {v:.3f}" for k, v in r.items() if k.startswith("reward")]
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def plot_losses(records: list[dict[str, Any]], out: Path, title: str) -> None:
    """Training loss (and evaluation loss, and the learning rate on a second axis) against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", lw=0.8, alpha=0.6,
                   label="lr")
        lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    try:
        with atomic_file(out, suffix=".png") as tmp:  # savefig reads the format from the suffix
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
