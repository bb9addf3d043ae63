"""Data for training from scratch: a BPE tokenizer with byte fallback in the Hugging Face layout
(read the same here and by transformers), and packed shards that resume byte-identically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import Tokenizer
from minicpm.training.shards import PackedTokens, pack_corpus
from minicpm.training.tokenizer import train_tokenizer
from tests.conftest import FIXTURES

WIKI = FIXTURES / "training" / "wiki" / "wiki.test.raw"
TEXTS = ["Hello world, the cat sat.", "a\nb  c", "emoji 🙂 and 中文 text", "Ünïcödé ß", "The game 's release"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpm.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer([WIKI], tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=600)


def test_trained_tokenizer_loads_here_and_in_transformers_alike(tokenizer_dir):
    import transformers
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(ours) == 600 and ours.bos_token_id == 1 and ours.eos_token_id == 2
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text) and ids[0] == 1
        assert ours.decode(ids, skip_special_tokens=True) == text == theirs.decode(ids, skip_special_tokens=True)


def test_unseen_characters_fall_back_to_bytes(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode("🙂", add_special_tokens=False)
    pieces = [tok.id_to_token(i) for i in ids]
    # "🙂" is F0 9F 99 82 in UTF-8: four byte tokens after the word marker, never <unk>
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"] and tok.unk_token_id not in ids
    assert tok.decode(ids) == "🙂"


def test_trained_tokenizer_chats_with_the_minicpm_template(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<用户>hi<AI>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert tok.token_to_id("<用户>") in ids and tok.token_to_id("<AI>") == ids[-1]


def test_tokenizer_cli_and_its_errors(tmp_path):
    done = cli("train", "tokenizer", str(WIKI), "--vocab-size", "500", "--out", str(tmp_path / "t"))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                           "special_tokens_map.json"}
    again = cli("train", "tokenizer", str(WIKI), "--vocab-size", "500", "--out", str(tmp_path / "t"))
    assert again.returncode == 2 and "--force" in again.stderr
    missing = cli("train", "tokenizer", str(tmp_path / "none.txt"), "--out", str(tmp_path / "u"))
    assert missing.returncode == 2 and "none.txt: no such file" in missing.stderr and "Traceback" not in missing.stderr
    small = cli("train", "tokenizer", str(WIKI), "--vocab-size", "100", "--out", str(tmp_path / "v"))
    assert small.returncode == 2 and "vocab_size must be at least" in small.stderr


def test_packing_writes_every_document_with_bos_and_eos(tokenizer_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    summary = pack_corpus([WIKI], tok, tmp_path / "packed", shard_tokens=5000, log=lambda m: None)
    packed = PackedTokens(tmp_path / "packed")
    lines = [line.strip() for line in WIKI.read_text(encoding="utf-8").splitlines() if line.strip()]
    expected = np.concatenate([[1] + tok.encode(line, add_special_tokens=False) + [2] for line in lines])
    assert packed.num_tokens == expected.size and f"{len(lines)} documents" in summary
    assert np.array_equal(packed.read(0, packed.num_tokens), expected)
    assert len(packed.index["shards"]) == -(-expected.size // 5000)
    # a read across a shard boundary
    assert np.array_equal(packed.read(4990, 20), expected[4990:5010])
    with pytest.raises(IndexError):
        packed.read(packed.num_tokens - 5, 10)


def test_an_interrupted_pack_resumes_to_identical_bytes(tokenizer_dir, tmp_path, monkeypatch):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    pack_corpus([WIKI], tok, tmp_path / "straight", shard_tokens=3000, log=lambda m: None)

    class Stop(Exception):
        pass

    calls = {"n": 0}
    import minicpm.training.shards as shards

    original = shards.write_shard

    def dies_after_two(*args, **kwargs):
        if calls["n"] == 2:
            raise Stop  # the process dies while writing the third shard
        calls["n"] += 1
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(shards, "write_shard", dies_after_two)
        with pytest.raises(Stop):
            pack_corpus([WIKI], tok, tmp_path / "resumed", shard_tokens=3000, log=lambda m: None)
    with pytest.raises(MiniCPMError, match="did not finish"):
        PackedTokens(tmp_path / "resumed")
    said = []
    pack_corpus([WIKI], tok, tmp_path / "resumed", shard_tokens=3000, log=said.append)
    assert said == ["resuming: 2 shard(s) already packed in " + str(tmp_path / "resumed")]
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in names:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    again = pack_corpus([WIKI], tok, tmp_path / "resumed", shard_tokens=3000, log=lambda m: None)
    assert "already complete" in again
    other = FIXTURES / "training" / "wiki" / "wiki.valid.raw"
    with pytest.raises(MiniCPMError, match="other files"):
        pack_corpus([other], tok, tmp_path / "resumed", shard_tokens=3000)


def test_bad_jsonl_records_are_reported_by_line_and_skipped_or_fatal(tokenizer_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "first document"}\nnot json\n{"body": "x"}\n\n[1, 2]\n{"text": "last one"}\n')
    said = []
    summary = pack_corpus([data], tokenizer_dir, tmp_path / "p", log=said.append)
    assert "2 documents" in summary and "3 bad records skipped" in summary
    assert [m.split(": skipped")[0].rsplit(", ", 1)[1] for m in said] == ["line 2", "line 3", "line 5"]
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    expected = [1, *tok.encode("first document", add_special_tokens=False), 2,
                1, *tok.encode("last one", add_special_tokens=False), 2]
    assert PackedTokens(tmp_path / "p").read(0, len(expected)).tolist() == expected
    done = cli("pack", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "q"), "--on-bad", "error")
    assert done.returncode == 2 and "docs.jsonl, line 2: not valid JSON" in done.stderr


def test_a_damaged_shard_is_named(tokenizer_dir, tmp_path):
    pack_corpus([WIKI], tokenizer_dir, tmp_path / "p", shard_tokens=4000, log=lambda m: None)
    shard = tmp_path / "p" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MiniCPMError, match="shard-00001.bin: missing or truncated"):
        PackedTokens(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert index["complete"] and index["dtype"] == "<u2"
