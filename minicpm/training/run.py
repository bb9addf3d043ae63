"""`minicpm train <pretrain|sft|dpo>`: a recipe made into a model, data, optimizer and schedule,
then handed to the Trainer.

Run directory (recipe `out`):
  recipe.yaml        the full recipe the run used
  log.jsonl          a record per logged step and per evaluation
  loss.png           the loss curve (with the learning rate)
  checkpoints/       step-NNNNNN (atomic; `latest` names the newest), see checkpoint.py
  final/             the trained weights: a checkpoint directory, or a PEFT adapter for LoRA
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from minicpm.errors import MiniCPMError
from minicpm.training import checkpoint as ckpt
from minicpm.training.distributed import Processes, setup, shard_model, teardown
from minicpm.training.recipe import Recipe, load_recipe
from minicpm.training.schedules import WSD, Cosine
from minicpm.training.trainer import Settings, Trainer


def run_recipe(kind: str, overrides: list[str], recipe_file: str | None = None, out: str | None = None,
               resume: bool = False, print_only: bool = False, echo=print) -> int:
    if resume and recipe_file is None:
        # continue with the recipe the run was started with (overrides still apply on top)
        recipe_file = _saved_recipe(kind, overrides, out)
    recipe = load_recipe(kind, recipe_file, overrides)
    if out is not None:
        recipe.out = out
    if print_only:
        print(recipe.to_yaml(), end="")
        return 0
    procs = setup()
    try:
        recipe.validate(procs.world_size)
        train(recipe, procs, resume=resume, echo=echo if procs.is_main else (lambda *a, **k: None))
    finally:
        teardown(procs)
    return 0


def _saved_recipe(kind: str, overrides: list[str], out: str | None) -> Path:
    """RUN/recipe.yaml of the run being resumed, without its stop_at (that session ended there)."""
    import yaml

    run_dir = Path(out) if out is not None else Path(load_recipe(kind, None, overrides).out)
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise MiniCPMError(f"--resume: {run_dir} has no checkpoint to continue from (no run there)")
    values = yaml.safe_load(saved.read_text(encoding="utf-8"))
    values.get("train", {}).pop("stop_at", None)
    unstopped = run_dir / ".recipe.resume.yaml"
    unstopped.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return unstopped


def train(recipe: Recipe, procs: Processes = Processes(), resume: bool = False, echo=print) -> dict:
    """Run `recipe` to the end (or from its run directory's last checkpoint with `resume`)."""
    run_dir = Path(recipe.out)
    start = _starting_point(recipe, run_dir, resume)
    if procs.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    torch.manual_seed(recipe.seed)
    model, tokenizer = build_model(recipe, procs.device)
    task, valid = build_tasks(recipe, model, tokenizer, run_dir, procs, echo)
    echo(describe(model, recipe, procs))
    if procs.distributed:
        shard_model(model)
    optimizer = build_optimizer(model, recipe)
    decay_start = None
    if recipe.schedule.decay_from:
        decay_start = ckpt.read_trainer_state(Path(recipe.schedule.decay_from))["step"]
    schedule = build_schedule(recipe, decay_start)
    settings = Settings(steps=recipe.train.steps, stop_at=recipe.train.stop_at, batch_size=recipe.train.batch_size,
                        micro_batch_size=recipe.train.micro_batch_size, seed=recipe.seed,
                        precision=recipe.train.precision, clip_grad_norm=recipe.train.clip_grad_norm,
                        log_every=recipe.train.log_every, eval_every=recipe.train.eval_every,
                        eval_batches=recipe.train.eval_batches, save_every=recipe.train.save_every,
                        keep_checkpoints=recipe.train.keep_checkpoints, title=f"{recipe.kind} {run_dir.name}")
    save_weights = weights_writer(model, tokenizer, recipe)
    trainer = Trainer(model, optimizer, schedule, task, settings, run_dir, save_weights, procs, valid, echo=echo)
    if start is not None:
        trainer.resume(start)
        if trainer.step >= settings.steps:
            raise MiniCPMError(f"{start} is at step {trainer.step}; train.steps ({settings.steps}) is not beyond it")
        what = "resuming from" if resume else "decay branch from"
        echo(f"{what} {start} (step {trainer.step})")
    last = trainer.fit()
    if trainer.step < settings.steps:
        echo(f"stopped at step {trainer.step} of {settings.steps} (train.stop_at); continue with --resume")
    elif procs.is_main:
        final = run_dir / "final"
        latest = ckpt.latest_checkpoint(run_dir)
        _publish_final(latest, final)
        echo(f"done: {settings.steps} steps; weights in {final}, log in {run_dir / 'log.jsonl'}, "
             f"curve in {run_dir / 'loss.png'}")
    return last


def _starting_point(recipe: Recipe, run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from: the run's own latest (--resume), a decay branch's stable
    checkpoint, or None for a fresh run. A fresh run never writes over an existing one."""
    existing = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume:
        if existing is None:
            raise MiniCPMError(f"--resume: {run_dir} has no checkpoint to continue from")
        return existing
    if existing is not None:
        raise MiniCPMError(f"{run_dir} already holds a run (checkpoints/); pass --resume to continue it "
                           "or choose another --out")
    if recipe.schedule.decay_from:
        branch = Path(recipe.schedule.decay_from)
        step = ckpt.read_trainer_state(branch)["step"]
        if step >= recipe.train.steps:
            raise MiniCPMError(f"schedule.decay_from is at step {step}; train.steps ({recipe.train.steps}) "
                               "must be beyond it (the decay runs from there to train.steps)")
        return branch
    return None


def _publish_final(latest: Path | None, final: Path) -> None:
    """RUN/final: the last checkpoint's weights, without the optimizer state."""
    import shutil

    if latest is None:
        return
    tmp = final.with_name(".final.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(latest, tmp, ignore=shutil.ignore_patterns(ckpt.STATE_FILE))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


# --- model -------------------------------------------------------------------------------------
def build_model(recipe: Recipe, device: torch.device):
    """(model, tokenizer): a checkpoint to continue from, or a fresh model from model.config."""
    import minicpm

    m = recipe.model
    if m.path is not None or recipe.kind != "pretrain":  # fine-tuning without a path: the default model
        model, tokenizer = minicpm.load(m.path, dtype=m.dtype, device=device)
        if tokenizer is None:
            raise MiniCPMError(f"{m.path} has no tokenizer files; training needs one")
    else:
        tokenizer = load_tokenizer(m.tokenizer)
        model = fresh_model(recipe, tokenizer, device)
    method = recipe.train.method
    if getattr(model.config, "quantization", None) and method == "full":
        raise MiniCPMError(f"{m.path} is quantized: fine-tune it with train.method=lora (QLoRA)")
    model.requires_grad_(method == "full")  # loading makes an inference model: nothing trainable
    if method in ("lora", "qlora"):
        from minicpm.training.lora import LoraSpec, add_lora

        if method == "qlora" and not model.config.quantization:
            from minicpm.quantization import quantize_model

            quantize_model(model, bits=recipe.lora.quant_bits, group_size=recipe.lora.quant_group_size, head="bf16")
        spec = LoraSpec(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                        targets=recipe.lora.targets)
        add_lora(model, spec, seed=recipe.seed)
    model.gradient_checkpointing = recipe.train.activation_checkpointing
    model.train()
    return model, tokenizer


def load_tokenizer(path: str):
    """The tokenizer of a tokenizer/checkpoint directory or a .gguf file."""
    from minicpm.loading import locate
    from minicpm.tokenizer import Tokenizer

    if Path(path).is_dir() and Tokenizer.exists(path):  # a tokenizer directory (no model in it)
        return Tokenizer.from_pretrained(path)
    where = locate(path)
    if where.is_file():
        from minicpm.formats.gguf.container import GGUFFile

        meta = GGUFFile(where).metadata
        return Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k.startswith("tokenizer.")})
    if not Tokenizer.exists(where):
        raise MiniCPMError(f"{path} has no tokenizer files")
    return Tokenizer.from_pretrained(where)


def fresh_model(recipe: Recipe, tokenizer, device: torch.device):
    """A new MiniCPM from model.config, initialised the muP way when the config has muP scalings."""
    from minicpm.config import MiniCPMConfig
    from minicpm.model import MiniCPMForCausalLM
    from minicpm.training.mup import mup_init

    fields = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, **recipe.model.config}
    try:
        config = MiniCPMConfig(**fields)
    except TypeError as exc:
        raise MiniCPMError(f"recipe: model.config: {exc}".replace("MiniCPMConfig.__init__() ", "")) from None
    if config.vocab_size < len(tokenizer):
        raise MiniCPMError(f"model.config.vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
                           f"vocabulary ({len(tokenizer)})")
    model = MiniCPMForCausalLM(config).to(dtype=_dtype(recipe.model.dtype), device=device)
    if config.dim_model_base and recipe.optim.mup:
        mup_init(model, seed=recipe.seed)
    return model


def _dtype(name: str) -> torch.dtype:
    from minicpm.loading.assemble import resolve_dtype

    return resolve_dtype(name)


# --- data --------------------------------------------------------------------------------------
def build_tasks(recipe: Recipe, model, tokenizer, run_dir: Path, procs: Processes, echo):
    """(training task, validation task or None) for the recipe's kind."""
    from minicpm.training import tasks

    d = recipe.data
    if recipe.kind == "pretrain":
        from minicpm.training.shards import PackedTokens

        def windows(path):
            packed = PackedTokens(path)
            if packed.vocab_size > model.config.vocab_size:
                raise MiniCPMError(f"{path} was packed with a {packed.vocab_size}-token vocabulary; the model "
                                   f"has {model.config.vocab_size}")
            return tasks.PretrainTask(packed, d.seq_len)

        return windows(d.train), (windows(d.valid) if d.valid else None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log = echo if procs.is_main else (lambda *a, **k: None)
    if recipe.kind == "sft":
        from minicpm.training.data import load_chat_dataset

        def chats(path):
            return tasks.SftTask(load_chat_dataset(path, tokenizer, d.seq_len, d.on_bad, log=log).examples, pad)

        return chats(d.train), (chats(d.valid) if d.valid else None)
    from minicpm.training.data import load_preference_dataset

    reference = reference_model(recipe, model)

    def pairs(path, name):
        loaded = load_preference_dataset(path, tokenizer, d.seq_len, d.on_bad, log=log).pairs
        task = tasks.DpoTask(loaded, pad, recipe.dpo.beta, reference=reference)
        if recipe.dpo.reference == "precomputed":
            task.precomputed = precomputed_reference(task, run_dir / f"reference_logps.{name}.pt", procs,
                                                     bf16=recipe.train.precision == "bf16")
            task.reference = None
        return task

    return pairs(d.train, "train"), (pairs(d.valid, "valid") if d.valid else None)


def reference_model(recipe: Recipe, model):
    """DPO's frozen reference, as a function batch -> summed log-probs [2B]: the policy with its
    adapters off (LoRA: no second copy), else a frozen copy of the starting model."""
    from minicpm.training.tasks import sequence_logps

    if recipe.train.method != "full":
        from minicpm.training.lora import adapters_disabled

        def with_adapters_off(batch):
            with adapters_disabled(model):
                return sequence_logps(model, batch)
        return with_adapters_off
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda batch: sequence_logps(frozen, batch)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


# --- optimizer and schedule --------------------------------------------------------------------
def build_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; with optim.mup the hidden matrices learn at lr / (d / d_base) (muP)."""
    from minicpm.training.mup import param_groups

    o = recipe.optim
    if o.mup:
        groups = param_groups(model, o.lr, o.weight_decay)
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
        groups = [dict(g, lr=o.lr, lr_scale=1.0) for g in groups if g["params"]]
    if not groups:
        raise MiniCPMError("nothing to train: the model has no trainable parameter")
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def build_schedule(recipe: Recipe, decay_start: int | None = None):
    """step -> lr. A decay branch (schedule.decay_from) decays from its checkpoint's step to
    train.steps; otherwise WSD (decaying over the last decay_fraction), cosine or constant."""
    s, lr, steps = recipe.schedule, recipe.optim.lr, recipe.train.steps
    if decay_start is not None:
        return WSD(lr, s.warmup_steps, decay_start, steps - decay_start, s.final_ratio, s.decay_shape)
    if s.kind == "cosine":
        return Cosine(lr, s.warmup_steps, steps, s.final_ratio)
    if s.kind == "constant" or s.decay_fraction == 0:
        return WSD(lr, s.warmup_steps, None, final_ratio=s.final_ratio)
    return WSD.for_budget(lr, steps, s.warmup_steps, s.decay_fraction, final_ratio=s.final_ratio,
                          decay_shape=s.decay_shape)


# --- checkpoint weights ------------------------------------------------------------------------
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


# --- what is about to run -----------------------------------------------------------------------
def describe(model, recipe: Recipe, procs: Processes) -> str:
    """Parameter counts and a memory estimate per process, printed before training starts."""
    from minicpm.training.lora import trainable_parameters

    trainable, total = trainable_parameters(model)
    est = memory_estimate(model, recipe, procs.world_size)
    gb = {k: v / 2**30 for k, v in est.items()}
    return (f"{recipe.kind} ({recipe.train.method}): {total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M "
            f"trainable; {procs.world_size} process(es); batch {recipe.train.batch_size} = micro-batch "
            f"{recipe.train.micro_batch_size} x {recipe.accumulation_steps_per_process // procs.world_size} "
            f"accumulation x {procs.world_size}\n"
            f"memory estimate per process: weights {gb['weights']:.2f} GB + gradients {gb['gradients']:.2f} GB + "
            f"AdamW {gb['optimizer']:.2f} GB + activations {gb['activations']:.2f} GB "
            f"= {gb['total']:.2f} GB")


def memory_estimate(model, recipe: Recipe, world_size: int = 1) -> dict[str, float]:
    """Bytes per process: weights (sharded by FSDP), fp32 gradients and AdamW's two fp32 moments
    for the trainable ones, and the activations kept for the backward pass of one micro-batch
    (per token and layer ~10 hidden-size and 4 FFN-size values, fewer with recomputation) plus
    the fp32 logits and their gradient."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = world_size if world_size > 1 else 1
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len * (2 if recipe.kind == "dpo" else 1)
    value = 2 if recipe.train.precision == "bf16" else 4
    per_layer = (10 * c.hidden_size + 4 * c.intermediate_size) * value
    if recipe.train.activation_checkpointing:
        activations = tokens * (c.num_hidden_layers * c.hidden_size * 4 + per_layer)
    else:
        activations = tokens * c.num_hidden_layers * per_layer
    activations += tokens * c.vocab_size * 4 * 3
    out = {"weights": weights / shard, "gradients": trainable * 4 / shard, "optimizer": trainable * 8 / shard,
           "activations": float(activations)}
    out["total"] = sum(out.values())
    return out


def main() -> int:
    """`python -m minicpm.training.run <kind> [key=value ...]`: the entry point for torchrun."""
    from minicpm.cli.main import main as cli_main

    return cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
