"""Chat prompts: exact text and ids of multi-turn conversations in each format, format choice,
template features, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}]
SYSTEM = [{"role": "system", "content": "You are terse."}]
SMOL_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(FIXTURES / "minicpm-spm" / "tokenizer.model"))


def load(name: str, **kwargs) -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / name, **kwargs)


def without_template(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


# --- MiniCPM <用户>...<AI> -----------------------------------------------------------------------
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_minicpm_format_text(generation_prompt):
    tok = load("minicpm-spm")

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    # the template ends every user turn with <AI> itself, so the flag changes nothing
    assert render(TURNS) == "<用户>Q1<AI>A1<用户>Q2<AI>"
    # a system prompt is plain text before the first <用户>, as the official template renders it
    assert render(SYSTEM + TURNS) == "You are terse.<用户>Q1<AI>A1<用户>Q2<AI>"
    assert render([{"role": "user", "content": "  你好 \n"}]) == "<用户>你好<AI>"  # stripped
    assert render(TURNS[:2]) == "<用户>Q1<AI>A1"


def test_minicpm_format_ids(sp):
    tok = load("minicpm-spm")
    ids = tok.apply_chat_template(TURNS, tokenize=True)
    assert ids == [1] + sp.encode("<用户>Q1<AI>A1<用户>Q2<AI>")  # BOS added once, as encode adds it
    assert ids == tok.encode(tok.apply_chat_template(TURNS))
    assert tok.apply_chat_template(SYSTEM + TURNS, tokenize=True) == [1] + sp.encode(
        "You are terse.<用户>Q1<AI>A1<用户>Q2<AI>")
    # "<用户>" is not one token: "<", "用", "户", ">" (pinned ids of the fixture vocabulary)
    assert tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True) == [
        1, 516, 890, 589, 772, 842, 674, 665, 890, 549, 562, 842]


def test_minicpm_builtin_format_equals_the_checkpoint_template(tmp_path):
    builtin = Tokenizer.from_pretrained(without_template(tmp_path, "minicpm-spm"))
    assert builtin.chat_template is None and builtin.default_chat_format() == "minicpm"
    checkpoint = load("minicpm-spm")
    for messages in (TURNS, SYSTEM + TURNS, TURNS[:2]):
        for flag in (True, False):
            assert builtin.apply_chat_template(messages, flag, tokenize=True) == \
                checkpoint.apply_chat_template(messages, flag, tokenize=True)


# --- ChatML -------------------------------------------------------------------------------------
def test_chatml_format_text():
    tok = load("minicpm-chatml")
    body = ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n")
    assert tok.apply_chat_template(TURNS) == body + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(TURNS, add_generation_prompt=False) == body
    assert tok.apply_chat_template(SYSTEM + TURNS) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n" + body + "<|im_start|>assistant\n")


def test_chatml_format_ids(sp):
    tok = load("minicpm-chatml")
    start, end = 1600, 1601
    expected = [1]
    for role, content in (("user", "Q1"), ("assistant", "A1"), ("user", "Q2")):
        # legacy SentencePiece: the text after each special token gets a dummy-prefix space
        expected += [start] + sp.encode(f"{role}\n{content}") + [end] + sp.encode("\n")
    expected += [start] + sp.encode("assistant\n")
    assert tok.apply_chat_template(TURNS, tokenize=True) == expected


def test_chatml_is_the_default_when_the_vocabulary_has_its_tokens(tmp_path):
    tok = Tokenizer.from_pretrained(without_template(tmp_path, "minicpm-chatml"))
    assert tok.chat_template is None and tok.default_chat_format() == "chatml"
    assert tok.apply_chat_template(TURNS) == load("minicpm-chatml").apply_chat_template(TURNS)


# --- SmolLM2-style template (byte-level BPE) -----------------------------------------------------
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm_template_text_and_ids(generation_prompt):
    tok = load("bpe-json")
    raw = RawTokenizer.from_file(str(FIXTURES / "bpe-json" / "tokenizer.json"))
    body = ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n")
    body += "<|im_start|>assistant\n" if generation_prompt else ""
    text = tok.apply_chat_template(TURNS, add_generation_prompt=generation_prompt)
    assert text == SMOL_SYSTEM + body  # its default system prompt
    with_system = tok.apply_chat_template(SYSTEM + TURNS, add_generation_prompt=generation_prompt)
    assert with_system == "<|im_start|>system\nYou are terse.<|im_end|>\n" + body
    ids = tok.apply_chat_template(TURNS, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == raw.encode(text, add_special_tokens=False).ids  # no BOS: add_bos_token is off
    assert ids[0] == 1 and ids.count(1) == text.count("<|im_start|>")


# --- choosing the format ------------------------------------------------------------------------
def test_chat_format_overrides_the_checkpoint_template():
    tok = load("minicpm-chatml")
    assert tok.apply_chat_template(TURNS, chat_format="minicpm") == "<用户>Q1<AI>A1<用户>Q2<AI>"
    tok = load("minicpm-chatml", chat_format="minicpm")
    assert tok.chat_format == "minicpm" and tok.apply_chat_template(TURNS).startswith("<用户>")
    assert tok.apply_chat_template(TURNS, chat_format="chatml").startswith("<|im_start|>user")


def test_unknown_chat_format():
    with pytest.raises(MiniCPMError, match="unknown chat_format 'vicuna'; known: minicpm, chatml"):
        load("minicpm-spm").apply_chat_template(TURNS, chat_format="vicuna")
    with pytest.raises(MiniCPMError, match="unknown chat_format"):
        load("minicpm-spm", chat_format="llama2")


def test_bos_is_never_added_twice():
    tok = load("minicpm-spm")
    tok.chat_templates["default"] = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                                     "{% endfor %}")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[:1] == [1] and ids.count(1) == 1


def test_template_features():
    tok = load("minicpm-spm")
    user = [{"role": "user", "content": "hi"}]
    tok.chat_templates["default"] = "{{ messages | length }} {{ eos_token }} {{ persona }}"
    assert tok.apply_chat_template(user, persona="pirate") == "1 </s> pirate"
    tok.chat_templates["default"] = ("{% for m in messages %}{% generation %}{{ m['content'] }}"
                                     "{% endgeneration %}{% break %}{% endfor %}")
    assert tok.apply_chat_template(user + user) == "hi"
    tok.chat_templates["default"] = "{{ strftime_now('%Y') | length }}"
    assert tok.apply_chat_template(user) == "4"


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, error", [
    ("hello", "messages must be a list"),
    (["hello"], "message 0 must be a dict"),
    ([{"content": "no role"}], "message 0 has no 'role'"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": None}], "message 0 'content' must be a string, got NoneType"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ["a", "b"]}],
     "message 1 'content' must be a string, got list"),
    ([{"role": 3, "content": "a"}], "message 0 'role' must be a string"),
])
def test_bad_messages(messages, error):
    with pytest.raises(MiniCPMError, match=error):
        load("minicpm-spm").apply_chat_template(messages)


def test_template_errors_become_minicpm_errors():
    tok = load("minicpm-spm")
    tok.chat_templates["default"] = "{{ raise_exception('only user turns, please') }}"
    with pytest.raises(MiniCPMError, match="chat template: only user turns, please"):
        tok.apply_chat_template(TURNS)
    tok.chat_templates["default"] = "{% for m in messages %}{{ m }"
    with pytest.raises(MiniCPMError, match="chat template does not parse"):
        tok.apply_chat_template(TURNS)
    tok.chat_templates["default"] = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(MiniCPMError, match="chat template"):  # the sandbox refuses
        tok.apply_chat_template(TURNS)
