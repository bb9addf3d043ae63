"""Parity with transformers on the same fixture files: ids, decoded text, chat templates, and
directories written by `save_pretrained` loaded back by `AutoTokenizer`.

References: `AutoTokenizer` (transformers 5: a `tokenizers`-backed LlamaTokenizer built from
tokenizer.model, or the tokenizer.json as is) and, for SentencePiece models, transformers'
slow `SentencePieceBackend` (legacy), which runs sentencepiece itself on the text between added
tokens. Known difference, kept on purpose and checked below: the fast tokenizer gives no
dummy-prefix space to text that already starts with a space (or "▁"); sentencepiece, the slow
tokenizer, llama.cpp and we do.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from minicpm.tokenizer import CHAT_FORMATS, Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
NAMES = ["minicpm-spm", "minicpm-chatml", "bpe-json"]
SAMPLES = json.loads((FIXTURES / "samples.json").read_text(encoding="utf-8"))
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": " 你好，请介绍一下你自己。 "},
     {"role": "assistant", "content": "我是一个语言模型。\n"},
     {"role": "user", "content": "What is 2 + 2? 😀"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
]


@pytest.fixture(scope="module", params=NAMES)
def pair(request) -> tuple[Tokenizer, object]:
    path = FIXTURES / request.param
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def comparable_with_fast(tok: Tokenizer, text: str) -> bool:
    """False where the fast SentencePiece tokenizer is known to differ: a piece of text (between
    added tokens) that starts with a space or "▁" gets no dummy prefix there."""
    if tok.backend.kind != "spm":
        return True
    contents = sorted((t.content for t in tok.backend.added.values()), key=len, reverse=True)
    pieces = re.split("|".join(map(re.escape, contents)), text)
    return not any(p.startswith((" ", "\u2581")) for p in pieces)


def test_ids_match_auto_tokenizer(pair):
    ours, hf = pair
    compared = 0
    for text in SAMPLES + [s.strip() for s in SAMPLES]:  # many wikitext lines start with a space
        if comparable_with_fast(ours, text):
            assert ours.encode(text) == hf.encode(text), text
            assert ours.encode(text, False) == hf.encode(text, add_special_tokens=False)
            compared += 1
    assert compared > len(SAMPLES)


@pytest.mark.parametrize("name", ["minicpm-spm", "minicpm-chatml"])
def test_ids_match_slow_legacy_sentencepiece_tokenizer(name):
    ours = Tokenizer.from_pretrained(FIXTURES / name)
    slow = SentencePieceBackend.from_pretrained(FIXTURES / name)
    assert slow.legacy
    for text in SAMPLES:  # every sample, leading spaces included
        assert ours.encode(text, add_special_tokens=False) == slow.encode(text), text
    assert ours.vocab_size == len(slow)


def test_leading_space_difference_with_the_fast_tokenizer():
    path = FIXTURES / "minicpm-spm"
    ours, fast = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    slow = SentencePieceBackend.from_pretrained(path)
    for text in (" Hello", "Hi</s> there"):
        assert ours.encode(text, add_special_tokens=False) == slow.encode(text)
        assert ours.encode(text, False) != fast.encode(text, add_special_tokens=False)


def test_decode_matches_auto_tokenizer(pair):
    ours, hf = pair
    for text in SAMPLES:
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_of_random_ids_matches_auto_tokenizer(pair):
    ours, hf = pair
    rng = random.Random(3)
    compared = 0
    for _ in range(400):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            theirs = hf.decode(ids, skip_special_tokens=skip)
            # SentencePiece: an invalid byte run decodes differently (see backends.py)
            if ours.backend.kind == "hf" or "\ufffd" not in theirs:
                assert ours.decode(ids, skip_special_tokens=skip) == theirs, ids
                compared += 1
    assert compared > 400


def test_special_tokens_and_sizes_match(pair):
    ours, hf = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    assert ours.special_token_ids == set(hf.all_special_ids)


# --- chat templates ----------------------------------------------------------------------------
def hf_chat_ids(hf, messages, template=None, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, chat_template=template, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_checkpoint_template_matches_transformers(pair, generation_prompt):
    ours, hf = pair
    bos = [ours.bos_token_id] if ours.add_bos_token else []
    for messages in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
        # transformers encodes the prompt without special tokens; we add BOS as encode() does
        ids = ours.apply_chat_template(messages, generation_prompt, tokenize=True)
        assert ids == bos + hf_chat_ids(hf, messages, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("chat_format", list(CHAT_FORMATS))
def test_builtin_formats_render_as_transformers_renders_them(pair, chat_format):
    ours, hf = pair
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            text = ours.apply_chat_template(messages, generation_prompt, chat_format=chat_format)
            assert text == hf.apply_chat_template(
                messages, chat_template=CHAT_FORMATS[chat_format], tokenize=False,
                add_generation_prompt=generation_prompt)


def test_template_variables_match_transformers():
    path = FIXTURES / "minicpm-chatml"
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
                "{{ eos_token }}{{ unk_token }}{{ greeting | default('none') }}"
                "{% if add_generation_prompt %}<go>{% endif %}")
    hf.chat_template = template
    ours.chat_templates["default"] = template
    messages = [{"role": "user", "content": "引号 \"q\" <tag> & é"}]
    for kwargs in ({}, {"greeting": "hi"}):
        assert ours.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs)


# --- save_pretrained, read back by transformers ------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_saved_directory_loads_identically_in_transformers(tmp_path, name):
    ours = Tokenizer.from_pretrained(FIXTURES / name)
    out = ours.save_pretrained(tmp_path / name)
    hf = AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        if comparable_with_fast(ours, text):
            assert hf.encode(text) == ours.encode(text), text
        ids = ours.encode(text)
        assert hf.decode(ids) == ours.decode(ids)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (
        ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.vocab_size)
    assert hf.chat_template == ours.chat_template
    for messages in CONVERSATIONS:
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(messages)


@pytest.mark.parametrize("name", NAMES)
def test_gguf_built_tokenizer_saves_a_directory_transformers_loads(tmp_path, name):
    original = Tokenizer.from_pretrained(FIXTURES / name)
    ours = Tokenizer.from_gguf_metadata(original.to_gguf_metadata())
    hf = AutoTokenizer.from_pretrained(ours.save_pretrained(tmp_path / name))
    for text in SAMPLES:
        if comparable_with_fast(ours, text):
            assert hf.encode(text) == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id, len(hf)) == (
        ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id, ours.vocab_size)


def test_non_legacy_config_matches_the_fast_tokenizer(tmp_path):
    out = tmp_path / "non-legacy"
    Tokenizer.from_pretrained(FIXTURES / "minicpm-chatml").save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["legacy"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, hf = Tokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        if comparable_with_fast(ours, text):
            assert ours.encode(text) == hf.encode(text), text


def test_added_token_strip_flags_match_transformers(tmp_path):
    out = tmp_path / "strip"
    Tokenizer.from_pretrained(FIXTURES / "minicpm-chatml").save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["1600"]["rstrip"] = True  # <|im_start|> eats spaces after it
    config["added_tokens_decoder"]["1601"]["lstrip"] = True  # <|im_end|> eats spaces before it
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_pretrained(out)
    slow, fast = SentencePieceBackend.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    texts = ["<|im_start|>  user\n hi  <|im_end|>  \n", "a <|im_end|><|im_start|> b",
             "x\n<|im_end|>"]
    for text in texts + SAMPLES:
        assert ours.encode(text, add_special_tokens=False) == slow.encode(text), text
        if comparable_with_fast(ours, text):
            assert ours.encode(text) == fast.encode(text), text
    def plain(text):
        return ours.encode(text, add_special_tokens=False)

    assert plain(texts[0]) == [1600] + plain("user\n hi") + [1601] + plain("  \n")
