"""Where a run starts: fresh, from its own latest checkpoint (--resume), or as a decay branch
from a stable-phase checkpoint (schedule.decay_from). A fresh run never writes over another."""

from __future__ import annotations

from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.files import write_text
from minicpm.training import checkpoint as ckpt
from minicpm.training.recipe import Recipe, load_recipe


def saved_recipe(kind: str, overrides: list[str], out: str | None) -> Path:
    """RUN/recipe.yaml of the run being resumed, without its stop_at (that session ended there)."""
    import yaml

    run_dir = Path(out) if out is not None else Path(load_recipe(kind, None, overrides).out)
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise MiniCPMError(f"--resume: {run_dir} has no checkpoint to continue from (no run there)")
    values = yaml.safe_load(saved.read_text(encoding="utf-8"))
    values.get("train", {}).pop("stop_at", None)
    unstopped = run_dir / ".recipe.resume.yaml"
    write_text(unstopped, yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    return unstopped


def starting_point(recipe: Recipe, run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from: the run's own latest (--resume), a decay branch's stable
    checkpoint, or None for a fresh run."""
    existing = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume:
        if existing is None:
            raise MiniCPMError(f"--resume: {run_dir} has no checkpoint to continue from")
        return existing
    if existing is not None:
        raise MiniCPMError(f"{run_dir} already holds a run (checkpoints/); pass --resume to "
                           "continue it or choose another --out")
    if recipe.schedule.decay_from:
        step = branch_step(recipe)
        if step >= recipe.train.steps:
            raise MiniCPMError(f"schedule.decay_from is at step {step}; train.steps "
                               f"({recipe.train.steps}) must be beyond it (the decay runs from "
                               "there to train.steps)")
        return Path(recipe.schedule.decay_from)
    return None


def branch_step(recipe: Recipe) -> int | None:
    """The step of the stable checkpoint a decay branch starts from (its decay starts there)."""
    if not recipe.schedule.decay_from:
        return None
    return ckpt.read_trainer_state(Path(recipe.schedule.decay_from))["step"]
