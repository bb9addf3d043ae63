"""`minicpm train <pretrain|sft|dpo|tokenizer>`: a recipe made into a model, data, optimizer and
schedule, then handed to the Trainer; also `python -m minicpm.training.run <kind> ...`, the
entry point for torchrun, which takes exactly the arguments of `minicpm train`.

Run directory (recipe `out`):
  recipe.yaml        the full recipe the run used
  log.jsonl          a record per logged step and per evaluation
  loss.png           the loss curve (with the learning rate)
  checkpoints/       step-NNNNNN (atomic; `latest` names the newest), see checkpoint.py
  final/             the trained weights: a checkpoint directory, or a PEFT adapter for LoRA
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minicpm.errors import MiniCPMError
from minicpm.files import write_text
from minicpm.kernels.allocator import apply_heap_policy
from minicpm.kernels.linear import bf16_is_native as cpu_multiplies_bf16
from minicpm.training import checkpoint as ckpt
from minicpm.training.distributed import Processes, barrier, setup, shard_model, teardown
from minicpm.training.memory import (
    choose_micro_batch,
    choose_recomputation,
    describe_run,
)
from minicpm.training.model_setup import build_trainable_model
from minicpm.training.optimizer_setup import build_optimizer, build_schedule
from minicpm.training.outputs import publish_final, weights_writer
from minicpm.training.profile import MemoryProfile
from minicpm.training.recipe import Recipe, load_recipe
from minicpm.training.resume import branch_step, saved_recipe, starting_point
from minicpm.training.task_setup import build_tasks
from minicpm.training.trainer import Trainer


def train_command(args: argparse.Namespace) -> int:
    """The `train` verb: a tokenizer, or a pretrain/sft/dpo recipe."""
    if args.recipe == "tokenizer":
        from minicpm.training.tokenizer import train_tokenizer

        out = train_tokenizer(args.files, args.out, vocab_size=args.vocab_size,
                              text_field=args.text_field, overwrite=args.force)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    return run_recipe(args.recipe, args.overrides, recipe_file=args.recipe_file, out=args.out,
                      resume=args.resume, print_only=args.print_recipe, dry_run=args.dry_run,
                      profile_memory=args.profile_memory)


def run_recipe(kind: str, overrides: list[str], recipe_file: str | None = None,
               out: str | None = None, resume: bool = False, print_only: bool = False,
               echo=print, dry_run: bool = False, profile_memory: bool = False) -> int:
    if resume and recipe_file is None:
        # continue with the recipe the run was started with (overrides still apply on top)
        recipe_file = saved_recipe(kind, overrides, out)
    recipe = load_recipe(kind, recipe_file, overrides)
    if out is not None:
        recipe.out = out
    if print_only:
        print(recipe.to_yaml(), end="")
        return 0
    procs = setup()
    try:
        echo = echo if procs.is_main else (lambda *a, **k: None)
        note = recipe.fit_warmup()
        if note:
            echo(note)
        recipe.validate(procs.world_size)
        train(recipe, procs, resume=resume, echo=echo, dry_run=dry_run, profile_memory=profile_memory)
    finally:
        teardown(procs)
    return 0


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware (else PyTorch converts it in software)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_multiplies_bf16()
    return True


def train(recipe: Recipe, procs: Processes = Processes(), resume: bool = False, echo=print,
          dry_run: bool = False, profile_memory: bool = False) -> dict:
    """Run `recipe` to the end (or from its run directory's last checkpoint with `resume`).
    `dry_run`: build the model and the data, print the plan, and write nothing.
    `profile_memory`: measure the resident memory of each phase (profile.py) and report it."""
    profile = MemoryProfile() if profile_memory else None
    note = recipe.fit_precision(bf16_is_native(procs.device))  # before anything reads it; recipe.yaml keeps it
    if note:
        echo(note)
    run_dir = Path(recipe.out)
    start = starting_point(recipe, run_dir, resume)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if procs.device.type == "cpu":
        apply_heap_policy(default="mid")  # kernels/allocator.py says why
    torch.manual_seed(recipe.seed)
    _phase(profile, "weights")
    model, tokenizer = build_trainable_model(recipe, procs.device)
    _phase(profile, "data")
    task, valid = build_tasks(recipe, model, tokenizer, run_dir, procs, echo, precompute=not dry_run)
    _phase(profile, "optimizer and setup")
    # unset sizes are chosen from the memory estimate; recipe.yaml keeps what was chosen
    for unset, choose in ((recipe.train.micro_batch_size is None, choose_micro_batch),
                          (recipe.train.activation_checkpointing is None, choose_recomputation)):
        note = choose(model, recipe, procs, task) if unset else None
        if note:
            echo(note)
    echo(describe_run(model, recipe, procs, task)[0])
    if dry_run:
        echo(f"dry run: nothing trained or written (the run would go to {run_dir})")
        return {}
    if procs.is_main:  # the recipe as it runs (recomputation decided)
        write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    if procs.distributed:
        shard_model(model)
    optimizer = build_optimizer(model, recipe)
    schedule = build_schedule(recipe, branch_step(recipe))
    save_weights = weights_writer(model, tokenizer, recipe)
    trainer = Trainer(model, optimizer, schedule, task, recipe, run_dir, save_weights, procs, valid,
                      echo=echo, profile=profile)
    steps = recipe.train.steps
    if start is not None:
        trainer.resume(start)
        if trainer.step >= steps:
            raise MiniCPMError(f"{start} is at step {trainer.step}; train.steps ({steps}) is not "
                               "beyond it")
        echo(f"{'resuming from' if resume else 'decay branch from'} {start} (step {trainer.step})")
    last = trainer.fit()
    if trainer.step < steps:
        echo(f"stopped at step {trainer.step} of {steps} (train.stop_at); continue with --resume")
    elif procs.is_main:
        final = run_dir / "final"
        publish_final(ckpt.latest_checkpoint(run_dir), final)
        echo(f"done: {steps} steps; weights in {final}, log in {run_dir / 'log.jsonl'}, "
             f"curve in {run_dir / 'loss.png'}")
    # The others wait for rank 0's last writes, so that no process tears the process group down
    # (and exits) while another still uses it: once, a second rank that did so aborted at exit
    # ("terminate called without an active exception") while rank 0 published the weights.
    barrier(procs)
    return last


def _phase(profile: MemoryProfile | None, name: str) -> None:
    if profile is not None:
        profile.enter(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m minicpm.training.run <kind> [key=value ...]`: `minicpm train <kind> ...`."""
    from minicpm.errors import run_reporting_errors
    from minicpm.training.command_line import add_train_parser, parse_args

    parser = argparse.ArgumentParser(prog="minicpm")
    # never set here (it would come after `train`); listed so that usage lines read as `minicpm`'s
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    add_train_parser(parser.add_subparsers(dest="verb", metavar="<verb>"))
    args = parse_args(parser, ["train", *(sys.argv[1:] if argv is None else argv)])
    return run_reporting_errors(train_command, args)


if __name__ == "__main__":
    sys.exit(main())
