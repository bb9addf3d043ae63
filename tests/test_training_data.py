"""Chat data for fine-tuning: labels cover exactly the assistant's tokens, both record formats
load, and bad records are reported with where they are."""

from __future__ import annotations

import json

import pytest

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import Tokenizer
from minicpm.training.data import (
    IGNORE_INDEX,
    BadRecord,
    load_chat_dataset,
    render_chat,
    to_messages,
)
from tests.conftest import FIXTURES

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Seine."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "The Loire."}]


@pytest.fixture(params=["minicpm-spm", "minicpm-chatml"])
def tokenizer(request) -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tokenizers" / request.param)


def trained_spans(example) -> list[list[int]]:
    spans, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def test_labels_are_the_assistant_turns(tokenizer):
    example = render_chat(tokenizer, CHAT)
    assert len(example.input_ids) == len(example.labels)
    # every label is the input at its own position (the model shifts them when computing the loss)
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(example.input_ids, example.labels))
    spans = trained_spans(example)
    assert len(spans) == 2
    texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans]
    assert texts == ["The Seine.", "The Loire."]
    # the conversation ends with a trained end-of-turn or end-of-sequence token
    assert example.labels[-1] != IGNORE_INDEX or example.labels[-2] in tokenizer.stop_token_ids
    assert any(t in tokenizer.stop_token_ids for t in spans[-1])
    # nothing the user or the system said is trained
    untrained = [i for i, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX]
    assert "Name a river" in tokenizer.decode(untrained)


def test_minicpm_format_matches_the_official_layout():
    """Official finetune.py: [bos] <用户>user<AI>assistant ... [eos]; labels on assistant text + eos."""
    tokenizer = Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    example = render_chat(tokenizer, messages)
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained_spans(example)[0], skip_special_tokens=True) == "hello"


def test_alpaca_records_become_a_conversation():
    messages = to_messages({"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "S"})
    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Translate\nbonjour"},
                        {"role": "assistant", "content": "hello"}]
    assert to_messages({"instruction": "Say hi", "input": "", "output": "hi"})[0]["content"] == "Say hi"


def test_max_len_truncates_and_a_record_left_without_answer_is_bad(tokenizer):
    full = render_chat(tokenizer, CHAT)
    cut = render_chat(tokenizer, CHAT, max_len=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    with pytest.raises(BadRecord, match="no assistant token"):
        render_chat(tokenizer, CHAT, max_len=4)


def test_bad_records_are_reported_with_their_line(tmp_path, tokenizer):
    lines = [json.dumps({"messages": CHAT[1:3]}),
             "{not json",
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
             json.dumps({"prompt": "wrong keys"}),
             "",
             json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    logged = []
    dataset = load_chat_dataset(path, tokenizer, log=logged.append)
    assert len(dataset) == 2
    assert [where for where, _ in dataset.skipped] == ["line 2", "line 3", "line 4", "line 5"]
    assert "not valid JSON" in dataset.skipped[0][1] and "message 0" in dataset.skipped[1][1]
    assert "no assistant" in dataset.skipped[2][1] and "expected 'messages'" in dataset.skipped[3][1]
    assert len(logged) == 4 and all("skipped" in m for m in logged)
    with pytest.raises(BadRecord, match="line 2: not valid JSON"):
        load_chat_dataset(path, tokenizer, on_bad="error")


def test_json_list_files_and_nothing_usable(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": CHAT}, {"messages": []}]))
    dataset = load_chat_dataset(path, tokenizer, log=lambda m: None)
    assert len(dataset) == 1 and dataset.skipped == [("record 2", "'messages' must be a non-empty list")]
    path.write_text(json.dumps([{"messages": []}]))
    with pytest.raises(MiniCPMError, match="no usable record"):
        load_chat_dataset(path, tokenizer, log=lambda m: None)
