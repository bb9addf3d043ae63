"""The tasks a recipe trains and evaluates on: packed windows (pretrain), chats (sft) or
preference pairs (dpo), with DPO's frozen reference (a model, or log-probs computed once)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_file
from minicpm.training import tasks
from minicpm.training.distributed import Processes
from minicpm.training.recipe import Recipe


def build_tasks(recipe: Recipe, model, tokenizer, run_dir: Path, procs: Processes, echo,
                precompute: bool = True):
    """(training task, validation task or None) for the recipe's kind; `precompute` False
    leaves DPO's precomputed reference log-probabilities for later (a dry run)."""
    d = recipe.data
    if recipe.kind == "pretrain":
        from minicpm.training.shards import PackedTokens

        def windows(path):
            packed = PackedTokens(path)
            if packed.vocab_size > model.config.vocab_size:
                raise MiniCPMError(f"{path} was packed with a {packed.vocab_size}-token "
                                   f"vocabulary; the model has {model.config.vocab_size}")
            return tasks.PretrainTask(packed, d.seq_len)

        return windows(d.train), (windows(d.valid) if d.valid else None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log = echo if procs.is_main else (lambda *a, **k: None)
    if recipe.kind == "sft":
        from minicpm.training.data import load_chat_dataset

        def chats(path):
            loaded = load_chat_dataset(path, tokenizer, d.seq_len, d.on_bad, log=log)
            if d.pack:
                return tasks.PackedSftTask(loaded.examples, pad, d.seq_len)
            return tasks.SftTask(loaded.examples, pad)

        return chats(d.train), (chats(d.valid) if d.valid else None)
    from minicpm.training.data import load_preference_dataset

    reference = reference_model(recipe, model)

    def pairs(path, name):
        loaded = load_preference_dataset(path, tokenizer, d.seq_len, d.on_bad, log=log).pairs
        task = tasks.DpoTask(loaded, pad, recipe.dpo.beta, reference=reference)
        if recipe.dpo.reference == "precomputed" and precompute:
            kept = run_dir / f"reference_logps.{name}.pt"
            task.precomputed = precomputed_reference(task, kept, procs,
                                                     bf16=recipe.train.precision == "bf16")
            task.reference = None
        return task

    return pairs(d.train, "train"), (pairs(d.valid, "valid") if d.valid else None)


def reference_model(recipe: Recipe, model):
    """DPO's frozen reference, as a function batch -> summed log-probs [2B]: the policy with its
    adapters off (LoRA: no second copy), else a frozen copy of the starting model."""
    if recipe.train.method != "full":
        from minicpm.training.lora import adapters_disabled

        def with_adapters_off(batch):
            with adapters_disabled(model):
                return tasks.sequence_logps(model, batch)
        return with_adapters_off
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda batch: tasks.sequence_logps(frozen, batch)


def precomputed_reference(task, path: Path, procs: Processes, bf16: bool) -> torch.Tensor:
    """Reference log-probs of every pair, [N, 2] (chosen, rejected), computed once (in the
    precision training uses) and kept in the run directory (a resumed run reads them back)."""
    if path.is_file():
        return torch.load(path)
    out = torch.zeros(task.num_samples, 2, dtype=torch.float64)
    for start in range(0, task.num_samples, 4):
        samples = list(range(start, min(start + 4, task.num_samples)))
        batch = {k: v.to(procs.device) for k, v in task.collate(samples).items()}
        with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=bf16):
            logps = task.reference_logps(batch).double().cpu()
        out[samples, 0], out[samples, 1] = logps[:len(samples)], logps[len(samples):]
    if procs.is_main:
        with atomic_file(path) as tmp:  # a run killed here must not read back half a file
            torch.save(out, tmp)
    return out
