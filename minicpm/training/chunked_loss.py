"""Cross-entropy without the whole logits: the next-token loss from the final hidden states, a
slice of target positions at a time.

The logits of a step are [tokens, vocab] in fp32: 4,096 x 49,152 x 4 bytes = 800 MB for the
default model at seq 512 x batch 8 (2 GB for MiniCPM-2B's 122,753), and autograd keeps them,
their log-softmax and their gradient. Here only positions with a target are projected
(`model.project`, which applies the muP logit scale), `LOGIT_BUDGET` logits at a time, and each
slice runs under activation checkpointing: the forward pass keeps the slice's hidden states and
its NLLs, and the backward pass recomputes the slice's logits, so at most one slice of logits
is alive at any time. Values and gradients are those of the plain loss (tested); only the order
of the final sums differs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minicpm.model import Linear
from minicpm.training.data import IGNORE_INDEX

LOGIT_BUDGET = 2**23  # fp32 logits per slice (32 MB; the backward pass holds a few such)


def target_nll(model, hidden: torch.Tensor, labels: torch.Tensor,
               budget: int = LOGIT_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL [T], row [T]) of every target token labels[b, s + 1] != IGNORE_INDEX given
    hidden[b, s], in row-major order; hidden [B, S, D] is `model(..., hidden=True)`."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    states, gold = hidden[:, :-1][keep], targets[keep]  # prompt and padding are never projected
    step = max(1, budget // model.config.vocab_size)
    recompute = torch.is_grad_enabled() and states.requires_grad
    project, parts = _projection(model), []
    for i in range(0, len(gold), step):
        args = (project, states[i:i + step], gold[i:i + step])
        parts.append(checkpoint(_slice_nll, *args, use_reentrant=False, preserve_rng_state=False)
                     if recompute else _slice_nll(*args))
    # no target at all: an empty NLL still joined to the graph, so backward() works
    return (torch.cat(parts) if parts else states.sum(-1)), rows


def _projection(model):
    """model.project, with a frozen float head cast to autocast's dtype once for all slices:
    autocast keeps its casts only of weights that require a gradient, so a frozen head was cast
    again for every slice and its recomputation (the default model's tied 49,152 x 576 fp32
    head: 21 ms a cast, ~60 a step at micro-batch 8, 2 threads)."""
    head = model.lm_head  # a float Linear (not LoRA's, not a quantized one), no bias: project's F.linear
    if type(head) is not Linear or head.bias is not None or head.weight.requires_grad:
        return model.project
    device = head.weight.device.type
    dtype = torch.get_autocast_dtype(device)
    if not torch.is_autocast_enabled(device) or head.weight.dtype == dtype:
        return model.project
    return functools.partial(model.project, head_weight=head.weight.to(dtype))


def _slice_nll(project, states: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(project(states), gold, reduction="none")


def summed_nll(model, hidden: torch.Tensor, labels: torch.Tensor, budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """The NLL summed over every target token of the batch (a scalar)."""
    return target_nll(model, hidden, labels, budget)[0].sum()


def row_nll(model, hidden: torch.Tensor, labels: torch.Tensor, budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """The NLL summed over each row's target tokens, [B]."""
    nll, rows = target_nll(model, hidden, labels, budget)
    return nll.new_zeros(len(labels)).index_add(0, rows, nll)
