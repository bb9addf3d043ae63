"""The ollama Modelfile written next to a GGUF export: exact text, and its TEMPLATE rendered (by a
tiny renderer for the Go-template subset we emit) equals our apply_chat_template."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from minicpm.formats.ollama import modelfile_path, modelfile_text
from minicpm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}]
SYSTEM = [{"role": "system", "content": "You are terse."}]

MINICPM_MODELFILE = '''\
# ollama create <name> -f m-q4_0.Modelfile
FROM ./m-q4_0.gguf
TEMPLATE """{{ range .Messages }}{{ if eq .Role "user" }}<用户>{{ .Content }}<AI>{{ else }}{{ .Content }}{{ end }}{{ end }}"""
PARAMETER stop "</s>"
PARAMETER stop "<用户>"
PARAMETER stop "<AI>"
PARAMETER temperature 0.3
PARAMETER top_p 0.8
'''
SMOLLM_MODELFILE = '''\
# ollama create <name> -f m-q4_0.Modelfile
FROM ./m-q4_0.gguf
TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
PARAMETER stop "<|im_start|>"
PARAMETER temperature 0.3
PARAMETER top_p 0.8
'''


def load(name: str) -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / name)


# --- a renderer for the Go-template subset the Modelfiles use ------------------------------------
def render_go(template: str, messages: list[dict]) -> str:
    """`range .Messages`, `if eq .Role "..."`/`else`/`end`, `.Role`, `.Content`; nothing else."""
    pieces = re.split(r"\{\{\s*(.*?)\s*\}\}", template)  # odd indices are actions
    tree, _, terminator = _parse(pieces, 0)
    assert terminator is None, f"stray {{{{ {terminator} }}}}"
    return _run(tree, {"Messages": messages})


def _parse(pieces: list[str], i: int) -> tuple[list, int, str | None]:
    """Nodes up to an `end`/`else` (returned as the terminator) or the end of the template."""
    nodes: list = []
    while i < len(pieces):
        piece, is_action, i = pieces[i], i % 2 == 1, i + 1
        if not is_action:
            nodes += [("text", piece)] if piece else []
        elif piece in ("end", "else"):
            return nodes, i, piece
        elif piece.startswith(("range ", "if ")):
            body, i, terminator = _parse(pieces, i)
            otherwise: list = []
            if terminator == "else":
                otherwise, i, terminator = _parse(pieces, i)
            assert terminator == "end", f"{piece} is not closed"
            nodes.append((piece, body, otherwise))
        else:
            nodes.append(("field", piece))
    return nodes, i, None


def _run(nodes: list, dot: dict) -> str:
    out = []
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "field":
            assert node[1].startswith("."), node[1]
            out.append(dot[node[1][1:]])
        elif kind.startswith("range "):
            out += [_run(node[1], item) for item in dot[kind.split()[1][1:]]]
        else:
            match = re.fullmatch(r'if eq \.(\w+) "(.*)"', kind)
            out.append(_run(node[1] if dot[match[1]] == match[2] else node[2], dot))
    return "".join(out)


def render_modelfile(text: str, messages: list[dict]) -> str:
    """What ollama sends the model: the Modelfile's SYSTEM becomes the first message when the
    conversation has none of its own, then TEMPLATE is rendered over the messages."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)[1]
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system[1]}, *messages]
    as_go = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return render_go(template, as_go)


# --- tests ----------------------------------------------------------------------------------------
def test_minicpm_modelfile_text():
    assert modelfile_text("m-q4_0.gguf", load("minicpm-spm")) == MINICPM_MODELFILE


def test_chatml_modelfile_text_with_the_checkpoints_default_system_prompt():
    assert modelfile_text("m-q4_0.gguf", load("bpe-json")) == SMOLLM_MODELFILE


def test_chatml_modelfile_of_a_minicpm_vocabulary():
    text = modelfile_text("m.gguf", load("minicpm-chatml"))
    assert '<|im_start|>{{ .Role }}\n' in text and "SYSTEM" not in text
    assert text.count("PARAMETER stop") == 3 and 'PARAMETER stop "</s>"' in text


@pytest.mark.parametrize("name", ["minicpm-spm", "minicpm-chatml", "bpe-json"])
@pytest.mark.parametrize("messages", [TURNS, SYSTEM + TURNS], ids=["plain", "system"])
def test_template_renders_as_apply_chat_template(name, messages):
    tokenizer = load(name)
    text = modelfile_text("m.gguf", tokenizer)
    assert render_modelfile(text, messages) == tokenizer.apply_chat_template(messages)


def test_renderer_itself():
    # guards the test's own renderer: else-branches, nesting, literal text around actions
    template = '[{{ range .Messages }}{{ if eq .Role "a" }}A{{ .Content }}{{ else }}-{{ end }}{{ end }}]'
    assert render_go(template, [{"Role": "a", "Content": "1"}, {"Role": "b", "Content": "2"}]) == "[A1-]"


def test_unknown_template_falls_back_to_the_vocabulary_format(tmp_path, caplog):
    directory = tmp_path / "odd"
    shutil.copytree(FIXTURES / "minicpm-spm", directory)
    config = directory / "tokenizer_config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    config.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="minicpm.formats.ollama"):
        text = modelfile_text("m.gguf", Tokenizer.from_pretrained(directory))
    assert "<用户>{{ .Content }}<AI>" in text and "neither" in caplog.text


def test_convert_to_gguf_writes_the_modelfile_next_to_it(tiny_checkpoint, tmp_path):
    from minicpm.formats.convert import convert

    out = convert(str(tiny_checkpoint), tmp_path / "tiny-q8_0.gguf", to="gguf", gguf_type="q8_0")
    modelfile = modelfile_path(out)
    assert modelfile == tmp_path / "tiny-q8_0.Modelfile"
    text = modelfile.read_text(encoding="utf-8")
    assert text.splitlines()[1] == "FROM ./tiny-q8_0.gguf"
    assert text == modelfile_text("tiny-q8_0.gguf", Tokenizer.from_pretrained(tiny_checkpoint))
