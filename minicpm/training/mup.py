"""muP as MiniCPM trains with it: width-scaled initialisation and per-parameter learning rates.

The model file already carries the forward-pass half of muP (embedding x scale_emb, residual
branches x scale_depth/sqrt(L), logits / (d / dim_model_base)). Training adds the other half
(MiniCPM paper, section on "model wind tunnel" experiments, with d_base = dim_model_base):
  - 2-D hidden weights (every Linear inside the decoder layers) start from
    N(0, (init_std / sqrt(d / d_base))^2) and learn at lr / (d / d_base);
  - the embedding (and an untied head, whose logits are already divided by d / d_base), norms
    and biases start as the model builds them and learn at the base lr.
With these, a learning rate tuned on a narrow proxy model transfers to a wide one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minicpm.errors import MiniCPMError


def width_multiplier(config) -> float:
    """d / d_base; 1 for a model without muP (a Llama checkpoint: no dim_model_base)."""
    if not config.dim_model_base:
        return 1.0
    return config.hidden_size / config.dim_model_base


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The 2-D weights that muP scales: every Linear weight inside the decoder layers."""
    return [(f"model.layers.{name}", p) for name, p in model.model.layers.named_parameters() if p.dim() == 2]


@torch.no_grad()
def mup_init(model: nn.Module, seed: int | None = None) -> None:
    """Re-initialise `model` in place: hidden matrices with the width-scaled std, the embedding
    (and an untied head) with init_std, norms to one, biases to zero."""
    config = model.config
    if seed is not None:
        torch.manual_seed(seed)
    std = config.initializer_range
    hidden = {id(p) for _, p in hidden_matrices(model)}
    for name, p in model.named_parameters():
        if id(p) in hidden:
            p.normal_(0.0, std / math.sqrt(width_multiplier(config)))
        elif p.dim() == 2:  # embedding, untied head
            p.normal_(0.0, std)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: hidden matrices at lr / (d / d_base) with weight decay; the
    embedding, an untied head, norms and biases at lr (decay only on the 2-D ones).

    Each group records its `lr_scale`, so a schedule can set group lr = schedule(step) * scale.
    """
    if lr <= 0:
        raise MiniCPMError(f"learning rate must be > 0, got {lr}")
    scale = 1.0 / width_multiplier(model.config)
    hidden = {id(p) for _, p in hidden_matrices(model)}
    groups = {"hidden": [], "matrices": [], "vectors": []}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "hidden" if id(p) in hidden else "matrices" if p.dim() == 2 else "vectors"
        groups[kind].append(p)
    specs = {"hidden": (scale, weight_decay), "matrices": (1.0, weight_decay), "vectors": (1.0, 0.0)}
    return [{"params": params, "lr": lr * specs[kind][0], "lr_scale": specs[kind][0],
             "weight_decay": specs[kind][1], "name": kind}
            for kind, params in groups.items() if params]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply this step's base learning rate to every group, each at its own muP scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
