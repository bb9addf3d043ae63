"""Training checkpoints: atomic, complete, and usable as they are.

`RUN/checkpoints/step-000500/` holds
  - the weights: a full Hugging Face checkpoint (config, safetensors, tokenizer), so
    `minicpm chat RUN/checkpoints/step-000500` works, or for LoRA runs a PEFT adapter;
  - trainer_state.pt: step, samples seen, optimizer state, random-number generator states.
It is written under a hidden temporary name and renamed when complete; `RUN/checkpoints/latest`
(rewritten atomically afterwards) names the newest. A run killed while saving leaves the previous
checkpoint and `latest` untouched; a half-written directory is removed by the next save.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_dir, remove_leftovers, write_text

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: Path, step: int, write_weights, trainer_state: dict[str, Any],
                     keep: int = 0) -> Path:
    """Write checkpoint `step`: `write_weights(directory)` fills an empty directory with the
    weights, then the trainer state goes beside them; the directory appears under its final name
    only when complete."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for name in ("step-*", LATEST):  # what a run killed while saving left behind
        remove_leftovers(root, name)
    final = root / step_name(step)
    with atomic_dir(final) as tmp:
        write_weights(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
    write_text(root / LATEST, final.name + "\n")
    if keep:
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise MiniCPMError(f"{checkpoint} is not a training checkpoint ({STATE_FILE} is missing)")
    return torch.load(path, map_location="cpu", weights_only=False)


def read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's weights (model safetensors, or the adapter's)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise MiniCPMError(f"{checkpoint} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state
