"""SFT/DPO micro-batches (pad_examples): the count of positions the layers compute is rounded up
by extending rows into their padding, which must change no loss or gradient."""

from __future__ import annotations

import random

import torch
from test_training_packing import assert_as_run_alone, examples

from minicpm.training import tasks
from minicpm.training.tasks import SftTask, round_real_positions
from tests.conftest import random_model, variant_config


def test_rounded_lengths_only_grow_within_the_width_to_a_multiple():
    rng = random.Random(0)
    for _ in range(500):
        width = rng.randint(1, 300)
        lengths = [rng.randint(1, width) for _ in range(rng.randint(1, 9))]
        rounded = round_real_positions(lengths, width, 64)
        assert all(n <= r <= width for n, r in zip(lengths, rounded))
        total = sum(rounded)
        assert total % 64 == 0 or total == width * len(lengths)
        assert total - sum(lengths) < 64


def test_extended_rows_change_no_loss_or_gradient(monkeypatch):
    monkeypatch.setattr(tasks, "ROW_MULTIPLE", 16)
    model = random_model(variant_config("2b"), seed=0).train().requires_grad_(True)
    data = examples(model.config.vocab_size)  # 37 tokens in rows of up to 12
    task = SftTask(data, pad_id=0)
    batch = task.collate(list(range(len(data))))
    mask = batch["attention_mask"]
    assert int(mask.sum()) == 48 and mask.shape == (5, 12)
    assert torch.equal(mask, (torch.arange(12) < mask.sum(-1, keepdim=True)).long())  # still prefixes
    assert_as_run_alone(model, task, batch, data)
