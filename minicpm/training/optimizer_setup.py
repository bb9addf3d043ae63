"""The optimizer and learning-rate schedule of a recipe: AdamW (muP learning rates per group)
and WSD, cosine or constant, or a decay branch from a stable-phase checkpoint."""

from __future__ import annotations

import torch

from minicpm.errors import MiniCPMError
from minicpm.training.recipe import Recipe
from minicpm.training.schedules import WSD, Cosine


def build_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; with optim.mup the hidden matrices learn at lr / (d / d_base) (muP)."""
    from minicpm.training.mup import param_groups

    o = recipe.optim
    if o.mup:
        groups = param_groups(model, o.lr, o.weight_decay)
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.dim() >= 2],
                   "weight_decay": o.weight_decay},
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
        return WSD(lr, s.warmup_steps, decay_start, steps - decay_start, s.final_ratio,
                   s.decay_shape)
    if s.kind == "cosine":
        return Cosine(lr, s.warmup_steps, steps, s.final_ratio)
    if s.kind == "constant" or s.decay_fraction == 0:
        return WSD(lr, s.warmup_steps, None, final_ratio=s.final_ratio)
    return WSD.for_budget(lr, steps, s.warmup_steps, s.decay_fraction, final_ratio=s.final_ratio,
                          decay_shape=s.decay_shape)
