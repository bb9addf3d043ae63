"""What is about to run: parameter counts, the batch split, and an estimate of the memory each
process needs, printed before training starts."""

from __future__ import annotations

from minicpm.training.distributed import Processes
from minicpm.training.recipe import Recipe


def describe_run(model, recipe: Recipe, procs: Processes) -> str:
    """Parameter counts, the batch split and a memory estimate per process."""
    from minicpm.training.lora import trainable_parameters

    trainable, total = trainable_parameters(model)
    est = memory_estimate(model, recipe, procs.world_size)
    gb = {k: v / 2**30 for k, v in est.items()}
    t, world = recipe.train, procs.world_size
    return (f"{recipe.kind} ({t.method}): {total / 1e6:.2f} M parameters, "
            f"{trainable / 1e6:.2f} M trainable; {world} process(es); batch {t.batch_size} = "
            f"micro-batch {t.micro_batch_size} x {recipe.accumulation_steps_per_process // world} "
            f"accumulation x {world}\n"
            f"memory estimate per process: weights {gb['weights']:.2f} GB + "
            f"gradients {gb['gradients']:.2f} GB + AdamW {gb['optimizer']:.2f} GB + "
            f"activations {gb['activations']:.2f} GB = {gb['total']:.2f} GB")


def memory_estimate(model, recipe: Recipe, world_size: int = 1) -> dict[str, float]:
    """Bytes per process: weights (sharded by FSDP), fp32 gradients and AdamW's two fp32 moments
    for the trainable ones, and the activations kept for the backward pass of one micro-batch
    (per token and layer ~10 hidden-size and 4 FFN-size values, fewer with recomputation) plus
    the fp32 logits and their gradient."""
    c = model.config
    unique = {id(p): p for p in model.parameters()}.values()  # a tied weight counts once
    weights = sum(p.numel() * p.element_size() for p in unique)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = world_size if world_size > 1 else 1
    pair = 2 if recipe.kind == "dpo" else 1  # chosen and rejected
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len * pair
    value = 2 if recipe.train.precision == "bf16" else 4
    per_layer = (10 * c.hidden_size + 4 * c.intermediate_size) * value
    if recipe.train.activation_checkpointing:
        activations = tokens * (c.num_hidden_layers * c.hidden_size * 4 + per_layer)
    else:
        activations = tokens * c.num_hidden_layers * per_layer
    activations += tokens * c.vocab_size * 4 * 3
    out = {"weights": weights / shard, "gradients": trainable * 4 / shard,
           "optimizer": trainable * 8 / shard, "activations": float(activations)}
    out["total"] = sum(out.values())
    return out
