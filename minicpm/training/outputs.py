"""The weights a run writes: those of each checkpoint (a full Hugging Face checkpoint, or the
PEFT adapter of a LoRA run) and RUN/final, the last checkpoint without its optimizer state."""

from __future__ import annotations

import shutil
from pathlib import Path

from minicpm.files import atomic_dir, remove_leftovers
from minicpm.training import checkpoint as ckpt
from minicpm.training.recipe import Recipe


def weights_writer(model, tokenizer, recipe: Recipe):
    """write(directory, full_state): a full checkpoint, or the PEFT adapter of a LoRA run."""
    if recipe.train.method in ("lora", "qlora"):
        from minicpm.training.lora import PREFIX, adapter_config, write_adapter

        config = adapter_config(model, recipe.model.path)

        def write_lora(directory: Path, full: dict) -> None:
            tensors = {PREFIX + k: v for k, v in full.items() if ".lora_A." in k or ".lora_B." in k}
            write_adapter(config, tensors, directory)
        return write_lora
    from minicpm.formats.hf import save_pretrained

    def write_full(directory: Path, full: dict) -> None:
        state = dict(full)
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_pretrained(model, tokenizer, directory, state_dict=state)
    return write_full


def publish_final(latest: Path | None, final: Path) -> None:
    """RUN/final: the last checkpoint's weights, without the optimizer state."""
    if latest is None:
        return
    remove_leftovers(final.parent, final.name)  # from a run killed while publishing
    with atomic_dir(final) as tmp:
        shutil.copytree(latest, tmp, ignore=shutil.ignore_patterns(ckpt.STATE_FILE),
                        dirs_exist_ok=True)
