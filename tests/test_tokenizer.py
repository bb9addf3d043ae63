"""Tokenizer: loading, ids, decoding, saving, errors and streaming, on the committed fixtures.

The fixtures (tests/fixtures/tokenizers, built by make_fixtures.py) are a tiny SentencePiece BPE
model with MiniCPM-2B's tokenizer_config (minicpm-spm), the same with ChatML tokens
(minicpm-chatml) and a SmolLM2-shaped byte-level BPE tokenizer.json (bpe-json). Expected ids
come from running `sentencepiece` / `tokenizers` directly on the same files.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
NAMES = ["minicpm-spm", "minicpm-chatml", "bpe-json"]
SAMPLES = json.loads((FIXTURES / "samples.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=NAMES)
def tok(request) -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / request.param)


@pytest.fixture(scope="module")
def spm_tok() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "minicpm-spm")


@pytest.fixture(scope="module")
def chatml_tok() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "minicpm-chatml")


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(FIXTURES / "minicpm-spm" / "tokenizer.model"))


# --- loading and properties --------------------------------------------------------------------
def test_minicpm_spm_properties(spm_tok):
    t = spm_tok
    assert (t.bos_token_id, t.eos_token_id, t.unk_token_id, t.pad_token_id) == (1, 2, 0, None)
    assert t.add_bos_token and not t.add_eos_token
    assert t.vocab_size == len(t) == 1600
    assert t.special_token_ids == {0, 1, 2}
    assert t.stop_token_ids == [2]
    assert t.chat_template.startswith("{% for message in messages %}")
    assert Tokenizer.exists(FIXTURES / "minicpm-spm") and not Tokenizer.exists(FIXTURES)


def test_chatml_tokens_are_added_after_the_sentencepiece_vocabulary(chatml_tok):
    t = chatml_tok
    assert t.vocab_size == 1602
    assert (t.token_to_id("<|im_start|>"), t.token_to_id("<|im_end|>")) == (1600, 1601)
    assert t.special_token_ids == {0, 1, 2, 1600, 1601}
    assert t.stop_token_ids == [2, 1601]  # </s>, then <|im_end|>
    assert t.default_chat_format() == "chatml"


def test_byte_level_bpe_properties():
    t = Tokenizer.from_pretrained(FIXTURES / "bpe-json")
    assert (t.bos_token_id, t.eos_token_id, t.unk_token_id, t.pad_token_id) == (1, 2, 0, 2)
    assert not t.add_bos_token and t.vocab_size == 1200
    assert t.stop_token_ids == [2, 0]  # <|im_end|>, <|endoftext|>
    assert t.special_token_ids == {0, 1, 2}


# --- encoding -----------------------------------------------------------------------------------
def test_spm_ids_are_sentencepiece_ids_plus_bos(spm_tok, sp):
    for text in SAMPLES:
        if not any(s in text for s in ("<s>", "</s>", "<unk>")):
            assert spm_tok.encode(text) == [1] + sp.encode(text), text
            assert spm_tok.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_special_token_text_maps_to_its_id_and_splits_the_text(spm_tok, sp):
    # legacy=True: each piece of text between special tokens gets its own dummy-prefix space
    assert spm_tok.encode("Hello</s> world") == [1] + sp.encode("Hello") + [2] + sp.encode(" world")
    assert spm_tok.encode("<s>Hi", add_special_tokens=False) == [1] + sp.encode("Hi")
    assert spm_tok.encode("</s></s>", add_special_tokens=False) == [2, 2]
    assert spm_tok.encode("<|im_start|>", add_special_tokens=False) == sp.encode("<|im_start|>")


def test_chatml_special_tokens(chatml_tok, sp):
    ids = chatml_tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids == [1, 1600] + sp.encode("user\nhi") + [1601] + sp.encode("\n")


def test_bpe_ids_are_tokenizers_ids():
    raw = RawTokenizer.from_file(str(FIXTURES / "bpe-json" / "tokenizer.json"))
    t = Tokenizer.from_pretrained(FIXTURES / "bpe-json")
    for text in SAMPLES:
        assert t.encode(text) == raw.encode(text, add_special_tokens=False).ids, text
    assert t.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert t.encode("year 2024")[-4:] == [t.token_to_id(d) for d in "2024"]  # digits one by one


def test_encode_rejects_non_strings(spm_tok):
    with pytest.raises(MiniCPMError, match="needs a string"):
        spm_tok.encode(["not", "a", "string"])


# --- decoding -----------------------------------------------------------------------------------
def test_decode_inverts_encode(tok):
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        if tok.backend.kind == "hf":
            assert tok.decode(ids) == text, text  # byte-level BPE is lossless
        elif not any(s in text for s in ("<s>", "</s>", "<unk>", "<|im_", "\u2581")):
            # one dummy-prefix space added, dropped again; SentencePiece reads "▁" as a space
            assert tok.decode(ids) == text, text


def test_spm_decode_details(spm_tok, sp):
    t = spm_tok
    assert t.decode(t.encode("Hello world")) == "<s> Hello world"
    assert t.decode(t.encode("Hello world"), skip_special_tokens=True) == "Hello world"
    assert t.decode(sp.encode("  two")) == "  two"  # only the one dummy-prefix space goes
    emoji = [sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert t.decode(emoji) == "😀"
    assert t.decode(emoji[:2]) == "\ufffd\ufffd"  # an unfinished character: one U+FFFD per byte
    assert t.decode([sp.piece_to_id("<0x0A>")] * 2) == "\n\n"
    assert t.decode([]) == "" and t.decode([10**6]) == ""  # ids outside the vocabulary: nothing


def test_ids_outside_the_vocabulary_decode_to_nothing(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.decode([-1] + ids + [tok.vocab_size, 10**9]) == tok.decode(ids)
    assert tok.id_to_token(-1) is None and tok.id_to_token(tok.vocab_size) is None
    assert "".join(stream(tok, [-1] + ids + [tok.vocab_size], True)) == tok.decode(ids)


def test_decode_accepts_tensors(spm_tok):
    torch = pytest.importorskip("torch")
    ids = spm_tok.encode("Hello world")
    assert spm_tok.decode(torch.tensor(ids)) == spm_tok.decode(ids)


# --- saving -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip(tmp_path, name):
    tok = Tokenizer.from_pretrained(FIXTURES / name)
    out = tok.save_pretrained(tmp_path / "saved")
    model_file = "tokenizer.json" if name == "bpe-json" else "tokenizer.model"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [model_file, "tokenizer_config.json", "special_tokens_map.json"])
    back = Tokenizer.from_pretrained(out)
    for text in SAMPLES:
        assert back.encode(text) == tok.encode(text)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "chat_template",
                 "add_bos_token", "special_token_ids", "stop_token_ids"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    original = json.loads((FIXTURES / name / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == original["tokenizer_class"]
    assert config["added_tokens_decoder"] == original["added_tokens_decoder"]


def test_save_replaces_a_model_file_of_the_other_kind(tmp_path):
    out = tmp_path / "tok"
    Tokenizer.from_pretrained(FIXTURES / "bpe-json").save_pretrained(out)
    Tokenizer.from_pretrained(FIXTURES / "minicpm-spm").save_pretrained(out)
    assert not (out / "tokenizer.json").exists()
    assert Tokenizer.from_pretrained(out).backend.kind == "spm"


# --- configuration variants ----------------------------------------------------------------------
def copy_fixture(tmp_path: Path, name: str, **config_changes) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v != "<drop>"}
    path.write_text(json.dumps(config), encoding="utf-8")
    return out


def test_add_eos_token_and_no_bos(tmp_path, sp):
    t = Tokenizer.from_pretrained(copy_fixture(tmp_path, "minicpm-spm", add_bos_token=False,
                                               add_eos_token=True))
    assert t.encode("Hi") == sp.encode("Hi") + [2]
    chat_ids = t.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert chat_ids == sp.encode("<用户>Hi<AI>")  # no EOS after a prompt


def test_named_template_list_and_jinja_file(tmp_path):
    templates = [{"name": "default", "template": "{{ messages[0]['content'] }}!"},
                 {"name": "tool_use", "template": "tools"}]
    out = copy_fixture(tmp_path, "minicpm-spm", chat_template=templates)
    t = Tokenizer.from_pretrained(out)
    assert t.chat_template == "{{ messages[0]['content'] }}!"
    assert t.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"
    saved = t.save_pretrained(tmp_path / "saved")
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == templates
    (out / "chat_template.jinja").write_text("{{ 'from the jinja file' }}", encoding="utf-8")
    assert Tokenizer.from_pretrained(out).chat_template == "{{ 'from the jinja file' }}"


def test_special_tokens_map_fills_what_the_config_lacks(tmp_path):
    out = copy_fixture(tmp_path, "bpe-json", pad_token="<drop>", bos_token="<drop>")
    assert Tokenizer.from_pretrained(out).pad_token_id == 2  # from special_tokens_map.json
    (out / "special_tokens_map.json").unlink()
    t = Tokenizer.from_pretrained(out)
    assert t.pad_token_id is None and t.bos_token_id is None and t.eos_token_id == 2


def test_bos_from_the_tokenizer_json_post_processor(tmp_path):
    from tokenizers import processors

    out = copy_fixture(tmp_path, "bpe-json")
    raw = RawTokenizer.from_file(str(out / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                       special_tokens=[("<|im_start|>", 1)])
    raw.save(str(out / "tokenizer.json"))
    t = Tokenizer.from_pretrained(out)
    assert t.add_bos_token and t.encode("hi")[0] == 1
    assert t.encode("hi", add_special_tokens=False)[0] != 1


def test_non_legacy_spm_prefixes_only_the_start(tmp_path, sp):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    t = Tokenizer.from_pretrained(copy_fixture(tmp_path, "minicpm-spm", legacy=False))
    assert t.encode("Hello</s>world") == [1] + sp.encode("Hello") + [2] + bare.encode("world")
    assert bare.encode("world") != sp.encode("world")
    assert t.encode("Hello</s> world") == [1] + sp.encode("Hello") + [2] + sp.encode("world")
    assert t.encode("<s>Hi", add_special_tokens=False) == [1] + bare.encode("Hi")


def test_llama_class_directory_with_both_files_reads_tokenizer_model(tmp_path, sp):
    transformers = pytest.importorskip("transformers")
    out = copy_fixture(tmp_path, "minicpm-spm")
    fast = transformers.AutoTokenizer.from_pretrained(out)
    fast.backend_tokenizer.save(str(out / "tokenizer.json"))
    t = Tokenizer.from_pretrained(out)
    assert t.backend.kind == "spm"
    assert t.encode(" Hello") == [1] + sp.encode(" Hello")  # sentencepiece, not the conversion
    other = copy_fixture(tmp_path / "other", "minicpm-spm",
                         tokenizer_class="PreTrainedTokenizerFast")
    shutil.copy(out / "tokenizer.json", other / "tokenizer.json")
    assert Tokenizer.from_pretrained(other).backend.kind == "hf"


# --- errors -------------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    with pytest.raises(MiniCPMError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(MiniCPMError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("fixture, file, content, message", [
    ("minicpm-spm", "tokenizer_config.json", b"{not json", "tokenizer_config.json is not valid JSON"),
    ("minicpm-chatml", "tokenizer.model", b"\x00garbage" * 10,
     "tokenizer.model: not a valid SentencePiece model"),
    ("bpe-json", "tokenizer.json", b'{"model": 3}', "tokenizer.json is not a valid tokenizer.json"),
])
def test_corrupt_files(tmp_path, fixture, file, content, message):
    folder = copy_fixture(tmp_path, fixture)
    (folder / file).write_bytes(content)
    with pytest.raises(MiniCPMError, match=message):
        Tokenizer.from_pretrained(folder)


def test_bad_special_token_and_template_values(tmp_path):
    with pytest.raises(MiniCPMError, match="special token"):
        Tokenizer.from_pretrained(copy_fixture(tmp_path, "minicpm-spm", eos_token=3))
    with pytest.raises(MiniCPMError, match="chat_template should be"):
        Tokenizer.from_pretrained(copy_fixture(tmp_path, "bpe-json", chat_template={"a": 1}))


# --- streaming ----------------------------------------------------------------------------------
def stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("skip", [True, False])
def test_stream_pushes_concatenate_to_decode(tok, skip):
    for text in SAMPLES:
        ids = tok.encode(text)
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in p for p in pieces), text  # never half a character


@pytest.mark.parametrize("skip", [True, False])
def test_stream_random_ids(tok, skip):
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 16))]
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_emits_each_character_once_complete(spm_tok, sp):
    emoji = [sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    ids = sp.encode("Hi") + emoji + sp.encode("there")
    pieces = stream(spm_tok, ids, True)
    n = len(sp.encode("Hi"))
    assert pieces[n:n + 4] == ["", "", "", "😀"]
    assert "".join(pieces) == "Hi😀 there"


def test_stream_window_stays_small(spm_tok):
    decoder = spm_tok.stream_decoder()
    text = " ".join(SAMPLES[-40:])
    ids = spm_tok.encode(text)
    longest = 0
    for i in ids:
        decoder.push(i)
        longest = max(longest, len(decoder.ids))
    assert len(ids) > 1000 and longest <= 8
