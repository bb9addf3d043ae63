"""The chunked loss against the plain one (whole logits, one cross-entropy): same value and
same gradients for every parameter, on tiny models with the muP logit scale on (and a tied
and an untied head), in fp32 and under bf16 autocast; and the whole logits are never kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minicpm.training.chunked_loss import row_nll, summed_nll, target_nll
from minicpm.training.data import IGNORE_INDEX
from tests.conftest import random_model, variant_config


def batch(vocab: int, rows: int = 3, width: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, labels with a prompt and right padding per row, and the attention mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    for r in range(rows):
        prompt, length = 3 + 2 * r, width - 4 * r
        labels[r, :prompt] = IGNORE_INDEX
        labels[r, length:] = IGNORE_INDEX
        mask[r, length:] = 0
    return ids, labels, mask


def plain_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, S-1] NLL from the whole logits, 0 where there is no target."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                          ignore_index=IGNORE_INDEX)
    return nll.view(len(labels), -1)


def loss_and_grads(name: str, loss_of, bf16: bool = False):
    model = random_model(variant_config(name), seed=0).train().requires_grad_(True)
    ids, labels, mask = batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of(model, ids, labels, mask)
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def plain_sum(model, ids, labels, mask):
    return plain_nll(model(ids, attention_mask=mask), labels).sum()


def chunked_sum(model, ids, labels, mask):
    # a budget of 5 tokens' logits: several slices, the last one short
    return summed_nll(model, model(ids, attention_mask=mask, hidden=True), labels, budget=5 * model.config.vocab_size)


def plain_rows(model, ids, labels, mask):
    return plain_nll(model(ids, attention_mask=mask), labels).sum(-1)


def chunked_rows(model, ids, labels, mask):
    return row_nll(model, model(ids, attention_mask=mask, hidden=True), labels, budget=7 * model.config.vocab_size)


def assert_same(a, b, tol: float) -> None:
    """Losses and every gradient equal to `tol` relative to their norm: slices of rows go
    through the head's matrix product in other blocks, which moves the last bit of a logit."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert float((loss_b - loss_a).norm()) <= tol * float(loss_a.norm())
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert float((grads_b[name] - grad).norm()) <= tol * float(grad.norm()), name


@pytest.mark.parametrize("name", ["2b", "128k", "llama"])  # tied + muP, untied + muP, neutral
def test_summed_loss_and_gradients_equal_the_plain_loss(name):
    assert_same(loss_and_grads(name, plain_sum), loss_and_grads(name, chunked_sum), 1e-6)


@pytest.mark.parametrize("name", ["2b", "128k"])
def test_sequence_log_probabilities_for_dpo_equal_the_plain_ones(name):
    assert_same(loss_and_grads(name, plain_rows), loss_and_grads(name, chunked_rows), 1e-6)


@pytest.mark.parametrize("name", ["2b", "llama"])
def test_one_slice_gives_bitwise_the_plain_token_losses(name):
    model = random_model(variant_config(name), seed=0)
    ids, labels, mask = batch(model.config.vocab_size)
    with torch.no_grad():
        plain = plain_nll(model(ids, attention_mask=mask), labels)
        nll, rows = target_nll(model, model(ids, attention_mask=mask, hidden=True), labels)  # default budget
    keep = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(nll, plain[keep])
    assert torch.equal(rows, keep.nonzero()[:, 0])


def test_under_bf16_autocast_too():
    # bf16 products of other row blocks round some results one bf16 step (2^-8) apart
    assert_same(loss_and_grads("2b", plain_sum, bf16=True), loss_and_grads("2b", chunked_sum, bf16=True), 3e-3)


def test_the_whole_logits_are_never_kept_for_the_backward_pass():
    model = random_model(variant_config("128k"), seed=0).train().requires_grad_(True)
    vocab = model.config.vocab_size  # 352: no other dimension of the model has that size
    ids, labels, mask = batch(vocab)

    def logit_rows_kept(loss_of) -> int:
        """The rows of the largest [..., vocab] tensor autograd keeps for the backward pass."""
        kept = [0]

        def keep(tensor):
            if tensor.dim() > 1 and tensor.shape[-1] == vocab:
                kept.append(tensor.numel() // vocab)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = loss_of(model, ids, labels, mask)
        loss.backward()
        return max(kept)

    assert logit_rows_kept(chunked_sum) == 0  # the slices are recomputed in the backward pass
    assert logit_rows_kept(plain_sum) >= int((labels[:, 1:] != IGNORE_INDEX).sum())  # the check can fail


def test_a_batch_without_targets_gives_zero_and_still_runs_backward():
    model = random_model(variant_config("2b"), seed=0).train().requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    loss = summed_nll(model, model(ids, hidden=True), torch.full_like(ids, IGNORE_INDEX))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(model.model.norm.weight.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["2b", "128k"])  # tied, untied
def test_a_frozen_head_is_cast_once_with_the_same_results(name, monkeypatch):
    from minicpm.training import chunked_loss

    def frozen_head_run(projection):
        monkeypatch.setattr(chunked_loss, "_projection", projection)
        model = random_model(variant_config(name), seed=0).train().requires_grad_(True)
        model.lm_head.weight.requires_grad_(False)  # a LoRA run: the (tied) head frozen
        ids, labels, mask = batch(model.config.vocab_size)
        casts = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(ids, attention_mask=mask, hidden=True)
            project = projection(model)
            casts.append(getattr(project, "keywords", {}).get("head_weight"))
            loss = summed_nll(model, hidden, labels, budget=5 * model.config.vocab_size)
        loss.backward()
        return casts[0], loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    once, loss, grads = frozen_head_run(chunked_loss._projection)
    _, loss_each, grads_each = frozen_head_run(lambda model: model.project)  # autocast's cast per slice
    assert once is not None and once.dtype is torch.bfloat16  # cast once, before the slices
    assert torch.equal(loss, loss_each) and grads.keys() == grads_each.keys() and grads
    for n, g in grads.items():
        assert torch.equal(g, grads_each[n]), n


@pytest.mark.parametrize("name", ["2b", "1b", "moe", "s", "llama"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_left_out_of_the_layers_changes_no_loss_or_gradient(name, recompute, side, monkeypatch):
    """Training on a padded batch runs the layers on the real positions only (skip_padding):
    the same loss and gradients as the whole [B, S] batch, which computes and discards the
    padding's rows (a row without any). Right-padded rows attend one at a time over their own
    tokens; left padding goes back to [B, S] for a masked attention. In float64, where only
    the order of sums differs (float32 moves the last bits: ~1e-6)."""
    import minicpm.model as model_module

    def run(leave_padding_out: bool):
        model = random_model(variant_config(name), seed=0).double().train().requires_grad_(True)
        model.gradient_checkpointing = recompute
        ids, labels, mask = batch(model.config.vocab_size, rows=4)  # row 0 has no padding
        if side == "left":  # nothing predicts a row's first token (its predecessor is padding)
            ids, labels, mask = ids.flip(-1), labels.flip(-1), mask.flip(-1)
            labels[torch.arange(4), (1 - mask).sum(-1)] = IGNORE_INDEX
        taken, by_row = [], []
        original, original_rows = model_module.RealTokens.take, model_module.Attention._attend_by_row
        monkeypatch.setattr(model_module.RealTokens, "take", lambda self, x: taken.append(len(self.index)) or original(self, x))
        monkeypatch.setattr(model_module.Attention, "_attend_by_row",
                            lambda self, *a: by_row.append(1) or original_rows(self, *a))
        loss = summed_nll(model, model(ids, attention_mask=mask, hidden=True, skip_padding=leave_padding_out), labels)
        loss.backward()
        monkeypatch.undo()
        return (taken, by_row, int(mask.sum())), loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (taken, by_row, real), *left_out = run(True)
    (none, _, _), *whole = run(False)
    assert none == [] and taken and set(taken) == {real} and real < 4 * 20  # the layers saw the real rows only
    assert bool(by_row) == (side == "right")
    assert_same(tuple(whole), tuple(left_out), 1e-12)
