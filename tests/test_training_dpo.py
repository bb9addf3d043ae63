"""Preference pairs and `minicpm train dpo` through the real CLI."""

from __future__ import annotations

import json
import math

import pytest

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import Tokenizer
from minicpm.training.data import IGNORE_INDEX, BadRecord, load_preference_dataset
from tests.conftest import FIXTURES
from tests.test_training_sft import base, train  # noqa: F401 (base is a fixture)

PAIRS = FIXTURES / "training" / "dpo_pairs.json"
COMMON = ["train.batch_size=4", "train.micro_batch_size=2", "train.log_every=1", "schedule.warmup_steps=1",
          "train.threads=1", "data.seq_len=192", "optim.lr=1e-2", f"data.train={PAIRS}"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")


def test_pairs_share_the_prompt_and_train_only_the_replies(tokenizer):
    dataset = load_preference_dataset(PAIRS, tokenizer)
    assert len(dataset) == 16 and not dataset.skipped
    for pair in dataset.pairs:
        c, r = pair.chosen, pair.rejected
        prompt = next(i for i, label in enumerate(c.labels) if label != IGNORE_INDEX)
        assert c.input_ids[:prompt] == r.input_ids[:prompt]  # the same prompt tokens
        assert all(label == IGNORE_INDEX for label in c.labels[:prompt] + r.labels[:prompt])
        assert c.labels[prompt:] == c.input_ids[prompt:] and c.input_ids[-1] == tokenizer.eos_token_id
    first = json.loads(PAIRS.read_text())[0]
    reply = tokenizer.decode([t for t in dataset.pairs[0].chosen.labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert reply.strip() == first["chosen"]["value"].strip()


def test_every_record_format_and_the_bad_ones(tokenizer, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
         "rejected": {"from": "gpt", "value": "Go away."}},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hello!", "rejected": {"role": "assistant", "content": "No."}},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Bye."},
        {"prompt": "Hi", "chosen": "Hello!"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes?"}],
         "chosen": "a", "rejected": "b"},
        {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    said = []
    dataset = load_preference_dataset(data, tokenizer, log=said.append)
    assert len(dataset) == 3
    assert [where for where, _ in dataset.skipped] == ["line 4", "line 5", "line 6", "line 7"]
    assert "'rejected' must be a non-empty reply" in dataset.skipped[0][1]
    assert "must end with a user turn" in dataset.skipped[1][1]
    assert "the same text" in dataset.skipped[2][1] and len(said) == 4
    with pytest.raises(BadRecord, match="line 4"):
        load_preference_dataset(data, tokenizer, on_bad="error")
    empty = tmp_path / "none.json"
    empty.write_text("[]")
    with pytest.raises(MiniCPMError, match="no usable preference pair"):
        load_preference_dataset(empty, tokenizer)


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_dpo_with_lora_starts_at_log2_and_separates_the_pairs(base, tmp_path):  # noqa: F811
    run = tmp_path / "lora"
    train("dpo", f"model.path={base}", *COMMON, "train.steps=6", "--out", str(run))
    log = read_log(run)
    # the policy starts equal to its reference (adapters off): every margin is 0, loss is log 2
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["reward_margin"] == 0 and log[0]["reward_accuracy"] == 0
    assert log[-1]["reward_margin"] > 0.5 and log[-1]["loss"] < 0.5 and log[-1]["reward_accuracy"] >= 0.75
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_precomputed_reference_equals_the_live_one(base, tmp_path):  # noqa: F811
    live, pre = tmp_path / "live", tmp_path / "pre"
    args = [f"model.path={base}", *COMMON, "train.steps=3", "train.precision=fp32", "train.method=full",
            "optim.lr=1e-3"]
    train("dpo", *args, "--out", str(live))  # full: a frozen copy of the starting model
    train("dpo", *args, "dpo.reference=precomputed", "--out", str(pre))
    assert (pre / "reference_logps.train.pt").is_file()
    for a, b in zip(read_log(live), read_log(pre)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["step"] == b["step"]
