"""JSON mode: the automaton accepts exactly the prefixes of one JSON object, the token-level
constraint agrees with it, and a sampling loop under the constraint always yields valid JSON."""

from __future__ import annotations

import json
import random

import pytest
import torch

from minicpm.generation.json_mode import START, JsonObjectConstraint, run
from minicpm.tokenizer import Tokenizer
from tests.conftest import FIXTURES

COMPLETE = [
    '{}', ' \n{ }', '{"a": 1}', '{"a": -0.5e+10, "b": [true, false, null], "c": {"d": []}}',
    '{"s": "quote \\" slash \\\\ \\/ \\b\\f\\n\\r\\t \\u00e9\\uD83D"}', '{"n": [0, -1, 2.25, 3E2, 4e-2]}',
    '{"nested": [[[{"x": [{}]}]]]}', '{"unicode": "é 中文"}',
]
PREFIXES = ['', '  ', '{', '{"', '{"a', '{"a":', '{"a": [', '{"a": [1', '{"a": [1,', '{"a": -', '{"a": 1.',
            '{"a": 1e', '{"a": 1e-', '{"a": t', '{"a": "\\', '{"a": "\\u00', '{"a": {"b": [null']
INVALID = ['[1]', '"s"', '1', 'x', '{"a" 1}', '{a: 1}', '{"a": 01}', '{"a": 1.}', '{"a": .5}', '{"a": tru}',
           '{"a": 1,}', '{"a": [1,]}', '{"a": [1}', '{"a": "\x01"}', '{"a": "\\x"}', '{"a": "\\u12g4"}',
           '{}}', '{} {}', '{"a": +1}', '{"a": 1e}', '{"a": --1}', "{'a': 1}", '{"a": NaN}']


@pytest.mark.parametrize("text", COMPLETE)
def test_complete_objects(text):
    assert is_json_object(text)  # the table itself
    assert run(START, text)[0] == "done"


@pytest.mark.parametrize("text", PREFIXES)
def test_prefixes_are_open(text):
    state = run(START, text)
    assert state is not None and state[0] != "done"


def is_json_object(text: str) -> bool:
    """Python's parser, made strict (no NaN/Infinity), as the oracle for the tables."""
    def refuse(constant: str):
        raise ValueError(constant)

    try:
        return isinstance(json.loads(text, parse_constant=refuse), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_refused(text):
    assert not is_json_object(text)  # the table itself
    state = run(START, text)
    assert state is None or state[0] != "done"


def test_trailing_whitespace_after_the_object():
    assert run(START, '{"a": 1}  \n')[0] == "done"
    assert run(START, '{"a": 1} x') is None


@pytest.fixture(scope="module", params=["minicpm-spm", "bpe-json"])
def tokenizer(request) -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tokenizers" / request.param)


def test_token_level_constraint_follows_the_text(tokenizer):
    text = '{"city": "Paris", "rivers": ["Seine"], "size": 105.4, "capital": true}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    constraint = JsonObjectConstraint(tokenizer)
    seen = ""
    for token_id in ids:
        assert constraint.allows(token_id), (seen, tokenizer.decode([token_id]))
        constraint.advance(token_id)
        seen += constraint.texts[token_id]
    assert constraint.complete and json.loads(seen) == json.loads(text)


def test_special_and_end_tokens(tokenizer):
    constraint = JsonObjectConstraint(tokenizer)
    eos = tokenizer.eos_token_id
    assert not constraint.allows(eos)  # nothing written yet
    assert not any(constraint.allows(t) for t in tokenizer.special_token_ids)
    for token_id in tokenizer.encode("{}", add_special_tokens=False):
        constraint.advance(token_id)
    assert constraint.complete and constraint.allows(eos)


def test_allowed_mask_agrees_with_allows(tokenizer):
    constraint = JsonObjectConstraint(tokenizer)
    rng = random.Random(0)
    for text in ('', '{"k', '{"k": ', '{"k": [1, '):
        constraint.state = run(START, text)
        mask = constraint.allowed_mask()
        sample = rng.sample(range(constraint.vocab_size), min(300, constraint.vocab_size))
        assert [bool(mask[t]) for t in sample] == [constraint.allows(t) for t in sample]
        assert mask.any()


def sample_json(tokenizer, seed: int, max_tokens: int = 400) -> tuple[str, bool]:
    """Random logits (biased towards closing characters so replies end) under the constraint,
    sampled the way the engine does: resample refused tokens, then fall back to the mask."""
    constraint = JsonObjectConstraint(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    closers = torch.tensor([any(c in (t or "") for c in '"}]') for t in constraint.texts])
    text = ""
    for _ in range(max_tokens):
        logits = torch.randn(constraint.vocab_size, generator=gen) * 2 + closers * 3.0
        for _ in range(8):
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if constraint.allows(token):
                break
            logits[token] = float("-inf")
        else:
            logits = logits.masked_fill(~constraint.allowed_mask(), float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert constraint.allows(token)
        constraint.advance(token)
        text += constraint.texts[token]
        if constraint.complete:
            return text, True
    return text, False


def test_sampling_under_the_constraint_gives_valid_json(tokenizer):
    finished = 0
    for seed in range(6):
        text, complete = sample_json(tokenizer, seed)
        state = run(START, text)
        assert state is not None  # every reply is a valid prefix, finished or not
        if complete:
            finished += 1
            assert is_json_object(text)
    assert finished >= 4
