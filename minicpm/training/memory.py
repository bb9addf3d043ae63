"""The plan printed before training: parameter counts, the batch split, tokens per step, and the
resident memory each phase will add, estimated from the model, the recipe and the data.

The estimate has the phases of `--profile-memory` (profile.py), so the two can be read side by
side:
  runtime, weights, data   measured: the resident set when the plan is printed
  optimizer state          fp32 gradients and AdamW's two fp32 moments of the trainable weights
  activations              what autograd keeps for the backward pass: per token and per layer,
                           measured on one decoder layer (two probe lengths, no backward pass, the
                           random generator untouched) and scaled to a micro-batch; attention
                           masks of padded batches; with recomputation, each layer's input plus
                           one layer's activations
  logits and loss          one slice of logits (chunked_loss.py) a few times over, and the
                           hidden states of the targets
  allocator                freed memory the C allocator keeps (a share of the activations)
"""

from __future__ import annotations

from pathlib import Path

import torch

from minicpm.training.chunked_loss import LOGIT_BUDGET
from minicpm.training.distributed import Processes
from minicpm.training.profile import resident
from minicpm.training.recipe import Recipe

GB = 2**30
PROBE_TOKENS = (16, 48)  # two lengths: the slope is per token, the rest is per layer
LOGIT_COPIES = 5  # a slice's logits alive at once in its backward: bf16 and fp32, softmax, grads
# of the activations: what the heap holds beyond live tensors at the peak (kernels/allocator.py).
# Measured 2026-12-07, LoRA of the default model, micro-batch 2, 20 steps: 0.55 with training's
# "mid" heap, 0.32 lean (peaks 2,147 and 1,959 MiB against 1,689 MiB for the other phases)
ALLOCATOR_SHARE = 0.4
ACTIVATION_BUDGET = 2**30  # bytes: one micro-batch's activations, when train.micro_batch_size is unset


def describe_run(model, recipe: Recipe, procs: Processes, task) -> tuple[str, dict[str, float]]:
    """(the plan as text, the estimate in bytes by phase with its "total")."""
    from minicpm.training.lora import trainable_parameters

    trainable, total = trainable_parameters(model)
    t, world = recipe.train, procs.world_size
    rows, width = rows_per_micro_batch(recipe), task.width()
    est = memory_estimate(model, recipe, rows, width, world)
    gb = {k: v / GB for k, v in est.items()}
    recompute = " (recomputed in the backward pass)" if model.gradient_checkpointing else ""
    text = (f"{recipe.kind} ({t.method}): {total / 1e6:.2f} M parameters, "
            f"{trainable / 1e6:.2f} M trainable; {world} process(es); batch {t.batch_size} = "
            f"micro-batch {t.micro_batch_size} x {recipe.accumulation_steps_per_process // world} "
            f"accumulation x {world}\n"
            f"tokens per step: up to {t.batch_size * width * (rows // t.micro_batch_size):,} "
            f"({rows} rows of up to {width} tokens per micro-batch)\n"
            f"memory estimate per process: runtime, weights and data {gb['loaded']:.2f} GB (now) + "
            f"optimizer state {gb['optimizer']:.2f} GB + activations {gb['activations']:.2f} GB"
            f"{recompute} + logits and loss {gb['loss']:.2f} GB + allocator {gb['allocator']:.2f} GB"
            f" = {gb['total']:.2f} GB")
    return text, est


def rows_per_micro_batch(recipe: Recipe, micro_batch_size: int | None = None) -> int:
    """Rows of a forward pass (DPO runs chosen and rejected together)."""
    return (micro_batch_size or recipe.train.micro_batch_size) * (2 if recipe.kind == "dpo" else 1)


def memory_estimate(model, recipe: Recipe, rows: int, width: int, world_size: int = 1,
                    recompute: bool | None = None,
                    probe: tuple[float, float] | None = None) -> dict[str, float]:
    """Bytes per process by phase (see the module's docstring), and their "total"; `recompute`
    None: as the model is set; `probe`: probe_activations' answer, if already known."""
    recompute = model.gradient_checkpointing if recompute is None else recompute
    c = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = max(world_size, 1)
    tokens = rows * width
    per_token, per_layer = probe or probe_activations(model, recipe.train.precision == "bf16")
    layer = tokens * per_token + per_layer
    if recipe.kind != "pretrain":  # padded batches: a [rows, 1, S, S] mask per layer, in bf16 or fp32
        layer += rows * width * width * (2 if recipe.train.precision == "bf16" else 4)
    if recompute:
        activations = c.num_hidden_layers * tokens * c.hidden_size * 4 + layer
    else:
        activations = c.num_hidden_layers * layer
    step = max(1, LOGIT_BUDGET // c.vocab_size)
    loss = LOGIT_COPIES * min(step, tokens) * c.vocab_size * 4 + tokens * c.hidden_size * 4
    out = {"loaded": float(resident()[0]), "optimizer": trainable * 12 / shard,
           "activations": float(activations), "loss": float(loss),
           "allocator": ALLOCATOR_SHARE * activations}
    out["total"] = sum(out.values())
    return out


def probe_activations(model, bf16: bool) -> tuple[float, float]:
    """(bytes per token, bytes per layer) that autograd keeps for one decoder layer's backward
    pass, from its forward pass at two lengths under the run's precision; the weights
    themselves are not counted (casts of them are)."""
    layer = model.model.layers[0]
    sizes = []
    for n in PROBE_TOKENS:
        x = torch.zeros(1, n, model.config.hidden_size, dtype=model.model.norm.weight.dtype,
                        device=model.device, requires_grad=True)
        cos, sin = model.model.rotary_emb(torch.arange(n, device=model.device)[None], n)
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            sizes.append(saved_bytes(model, lambda: layer(x, cos, sin, None, None)))
    (n0, n1), (s0, s1) = PROBE_TOKENS, sizes
    per_token = (s1 - s0) / (n1 - n0)
    return per_token, max(0.0, s0 - per_token * n0)


def saved_bytes(model, run) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `run()` runs, each
    storage once, the model's weights aside."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        run()
    return sum(kept.values())


def available_memory() -> float | None:
    """Bytes this process may still grow by: MemAvailable of /proc/meminfo (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_micro_batch(model, recipe: Recipe, procs: Processes, task) -> str | None:
    """train.micro_batch_size unset: the largest divisor of each process's share of the batch
    whose activations fit ACTIVATION_BUDGET (at least 1), set in the recipe; returns the note
    to print when that is fewer than the whole share."""
    t = recipe.train
    share = t.batch_size // procs.world_size
    probe = probe_activations(model, t.precision == "bf16")
    recompute = bool(t.activation_checkpointing)
    sizes = [m for m in range(share, 0, -1) if share % m == 0]
    width = task.width()  # a scan of every example: once, not once per candidate size
    fits = [m for m in sizes if memory_estimate(model, recipe, rows_per_micro_batch(recipe, m), width,
                                                procs.world_size, recompute, probe)["activations"]
            <= ACTIVATION_BUDGET]
    t.micro_batch_size = fits[0] if fits else 1
    if t.micro_batch_size == share:
        return None
    return (f"note: micro-batch {t.micro_batch_size} x {share // t.micro_batch_size} accumulation steps "
            f"per process keeps activations within {ACTIVATION_BUDGET / GB:.0f} GB "
            f"(train.micro_batch_size=N sets it)")


def choose_recomputation(model, recipe: Recipe, procs: Processes, task,
                         available: float | None = None) -> str | None:
    """train.activation_checkpointing unset: recompute the activations in the backward pass when
    the estimate without recomputation does not fit the memory available (`available` bytes,
    default: now, from /proc/meminfo) with a 10% margin, and set the recipe accordingly;
    returns the note to print, if recomputing."""
    est = memory_estimate(model, recipe, rows_per_micro_batch(recipe), task.width(), procs.world_size,
                          recompute=False)
    available = available_memory() if available is None else available
    growth = est["total"] - est["loaded"]
    recompute = available is not None and growth > 0.9 * available
    model.gradient_checkpointing = recipe.train.activation_checkpointing = recompute
    if not recompute:
        return None
    return (f"note: without recomputation the run needs about {est['total'] / GB:.1f} GB, more than the "
            f"{(available + est['loaded']) / GB:.1f} GB available: activations are recomputed in the "
            "backward pass (train.activation_checkpointing=false keeps them)")
