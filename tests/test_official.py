"""Parity with the official MiniCPM modeling code, through outputs it recorded on tiny seeded
checkpoints of every variant (tests/fixtures/official/README.md says how)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minicpm
from minicpm.formats.hf import load_model

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
VARIANTS = ["2b", "1b", "128k", "moe", "s"]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(params=VARIANTS)
def case(request):
    folder = OFFICIAL / request.param
    return load_model(folder), load_file(str(folder / "reference.safetensors"))


def test_full_forward_logits(case):
    model, ref = case
    torch.testing.assert_close(model(ref["input_ids"]), ref["logits"], **TOL)


def test_greedy_continuation(case):
    model, ref = case
    new = model.generate(ref["prompt_ids"], max_new_tokens=10, stop_token_ids=[])
    assert new.tolist() == ref["greedy_ids"].tolist()


def test_left_padded_batch(case):
    model, ref = case
    mask = ref["padded_mask"]
    ours = model(ref["padded_ids"], attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref["padded_logits"][real], **TOL)
    new = model.generate(ref["padded_ids"][0, 3:].tolist(), max_new_tokens=10, stop_token_ids=[])
    both = model.generate([ref["padded_ids"][0, 3:].tolist(), ref["padded_ids"][1].tolist()],
                          max_new_tokens=10, stop_token_ids=[])
    assert both == ref["padded_greedy_ids"].tolist()
    assert both[0] == new


def test_dynamic_ntk_beyond_the_context():
    model = load_model(OFFICIAL / "128k")
    ref = load_file(str(OFFICIAL / "128k" / "reference.safetensors"))
    assert ref["long_ids"].shape[1] > model.config.max_position_embeddings
    torch.testing.assert_close(model(ref["long_ids"]), ref["long_logits"], **TOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_keep_greedy_close(dtype):
    model = minicpm.load(str(OFFICIAL / "2b"), dtype=dtype)[0]
    ref = load_file(str(OFFICIAL / "2b" / "reference.safetensors"))
    logits = model(ref["input_ids"])
    agree = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean()
    assert agree > 0.9
