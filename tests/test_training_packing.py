"""SFT packing (data.pack): short examples share a row, each with its own positions and
attending only to itself, so a packed row's loss and gradients are the sum of its examples'
own losses and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm.training.data import IGNORE_INDEX, Example
from minicpm.training.tasks import PackedSftTask, pack_examples
from tests.conftest import random_model, variant_config


def examples(vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, prompt in ((9, 3), (5, 2), (12, 4), (4, 1), (7, 5)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_rows_hold_at_most_the_width_and_every_example_once():
    data = examples(300)
    rows = pack_examples(data, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(data)))
    assert all(sum(len(data[i].input_ids) for i in row) <= 16 for row in rows)
    assert len(rows) == 3 and rows == pack_examples(data, 16)  # 37 tokens in 3 rows of 16, always the same


def alone(model, e: Example) -> torch.Tensor:
    """The summed NLL of one example run by itself (no padding, no neighbours)."""
    logits = model(torch.tensor([e.input_ids]))[0, :-1]
    return F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum")


def test_packed_loss_and_gradients_equal_the_examples_run_alone():
    model = random_model(variant_config("2b"), seed=0).train().requires_grad_(True)
    data = examples(model.config.vocab_size)
    task = PackedSftTask(data, pad_id=0, width=16)
    samples = list(range(task.num_samples))
    batch = task.collate(samples)
    assert batch["attention_mask"].shape == (3, 1, 16, 16)
    assert task.count(samples) == sum(e.trained_tokens - (e.labels[0] != IGNORE_INDEX) for e in data)
    assert_as_run_alone(model, task, batch, data)


def assert_as_run_alone(model, task, batch, data: list[Example]) -> None:
    """The task's loss and gradients on `batch` equal the sum of its examples' run alone."""
    loss, _ = task.loss(model, batch)
    loss.backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = sum(alone(model, e) for e in data)
    reference.backward()
    loss, reference = float(loss.detach()), float(reference.detach())
    assert abs(loss - reference) <= 1e-6 * reference
    for name, p in model.named_parameters():
        assert float((batched[name] - p.grad).norm()) <= 1e-5 * float(p.grad.norm()), name


def test_without_the_block_mask_the_loss_would_differ():
    """The check above can fail: plain causal attention over a packed row lets an example see
    the one before it."""
    model = random_model(variant_config("2b"), seed=0)
    data = examples(model.config.vocab_size)
    batch = PackedSftTask(data, pad_id=0, width=16).collate([0])
    with torch.no_grad():
        masked = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"])
        causal = model(batch["input_ids"], position_ids=batch["position_ids"])
    assert not torch.allclose(masked, causal, atol=1e-3)
