"""GGUF tokenizer metadata (`tokenizer.ggml.*`) to and from our two backends.

- "llama" (SentencePiece): the pieces, scores and types become a SentencePiece BPE ModelProto
  (identity normaliser, dummy prefix per `add_space_prefix`, byte fallback when byte pieces
  exist), which `sentencepiece` then runs exactly as llama.cpp's SPM tokenizer does: merge the
  adjacent pair of highest score first.
- "gpt2" (byte-level BPE): tokens and merges become a `tokenizers` BPE whose pre-tokenizer is the
  list of regexes llama.cpp's `llama-vocab.cpp` uses for the `tokenizer.ggml.pre` name, each a
  split that keeps both matches and the text between them, then the byte-to-unicode mapping.

Token types (llama.cpp's enum, the same numbers as SentencePiece's piece types): 1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Unknown and control tokens become
special added tokens, user-defined ones non-special added tokens (both are cut out of the text
before tokenizing; only special ones are dropped by `skip_special_tokens`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.tokenizer.backends import AddedToken, HfBackend, SpmBackend, load_proto

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
K = "tokenizer.ggml."

# Pre-tokenizer regexes of llama.cpp (src/llama-vocab.cpp), applied one after the other.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REST = (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REST = _LLAMA3_REST.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_LLAMA3 = _CONTRACTIONS + _LLAMA3_REST
_QWEN2 = _CONTRACTIONS + _QWEN2_REST
PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
}
# Other `pre` names llama.cpp maps onto the same regexes.
_PRE_ALIASES = {
    **dict.fromkeys(["mpt", "olmo", "jais", "trillion", "granite-docling", "phi-2", "jina-es",
                     "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
                     "exaone4"], "gpt-2"),
    **dict.fromkeys(["starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    "smollm"),
    **dict.fromkeys(["llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"], "llama-bpe"),
    **dict.fromkeys(["deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"], "qwen2"),
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                  "lfm2"}
# How tokenizer.json files spell the same splits. The GPT-2 regex of transformers ends in
# "|\s+", which only claims a lone whitespace character that the split keeps as its own piece
# anyway; llama.cpp rewrote the case-insensitive contractions of Llama-3 and Qwen2.
_HF_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_HF_SPELLINGS = {
    _GPT2 + r"|\s+": _GPT2,
    _HF_CONTRACTIONS + _LLAMA3_REST: _LLAMA3,
    _HF_CONTRACTIONS + _QWEN2_REST: _QWEN2,
}


def pre_regexes(pre: str | None) -> list[str]:
    name = _PRE_ALIASES.get(pre or "default", pre or "default")
    if name not in PRE_REGEXES:
        logger.warning("GGUF pre-tokenizer %r is not known; using llama.cpp's 'default'", pre)
        name = "default"
    return PRE_REGEXES[name]


def adds_bos_by_default(model: str, pre: str | None) -> bool:
    """llama.cpp's default when a file has no add_bos_token: SentencePiece adds BOS, BPE
    does not, except for the Llama-3 family."""
    return model == "llama" or pre in _IGNORE_MERGES


def special_ids(meta: dict[str, Any]) -> dict[str, int | None]:
    """bos/eos/unk/pad/eot/eom ids; a SentencePiece file without them gets llama.cpp's
    defaults (<unk> 0, <s> 1, </s> 2)."""
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
            "pad": "padding_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}
    defaults = {"unk": 0, "bos": 1, "eos": 2} if meta.get(K + "model") == "llama" else {}
    return {name: _int_or_none(meta.get(K + key, defaults.get(name))) for name, key in keys.items()}


def added_from_types(tokens: list[str], types: list[int]) -> dict[int, AddedToken]:
    return {i: AddedToken(tokens[i], special=t in (UNKNOWN, CONTROL))
            for i, t in enumerate(types) if t in (UNKNOWN, CONTROL, USER_DEFINED)}


# --- "llama": SentencePiece --------------------------------------------------------------------
def spm_from_gguf(meta: dict[str, Any]) -> SpmBackend:
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = _strings(meta, "tokens")
    scores = [float(s) for s in meta.get(K + "scores") or [0.0] * len(tokens)]
    types = _token_types(meta, len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise MiniCPMError(f"GGUF tokenizer: {len(tokens)} tokens but {len(scores)} scores "
                           f"and {len(types)} types")
    ids = special_ids(meta)
    if UNKNOWN not in types and ids["unk"] is not None and ids["unk"] < len(types):
        types[ids["unk"]] = UNKNOWN  # SentencePiece needs its unknown piece
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=token, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for name in ("unk", "bos", "eos", "pad"):
        token_id = ids[name]
        setattr(spec, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None and token_id < len(tokens):
            setattr(spec, f"{name}_piece", tokens[token_id])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get(K + "add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(meta.get(K + "remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    return SpmBackend(proto.SerializeToString(), added_from_types(tokens, types), legacy=True,
                      source="GGUF tokenizer metadata")


def spm_to_gguf(backend: SpmBackend) -> dict[str, Any]:
    proto = load_proto(backend.proto)
    tokens, scores, types = [], [], []
    for i in range(len(backend)):
        piece = proto.pieces[i] if i < backend.n_pieces else None
        added = backend.added.get(i)
        kind = piece.type if piece is not None else UNUSED
        if added is not None and kind not in (UNKNOWN, CONTROL, USER_DEFINED):
            kind = CONTROL if added.special else USER_DEFINED
        tokens.append(backend.token_of(i) or f"[PAD{i}]")
        scores.append(piece.score if piece is not None else 0.0)
        types.append(kind)
    return {K + "model": "llama", K + "pre": "default", K + "tokens": tokens, K + "scores": scores,
            K + "token_type": types, K + "add_space_prefix": backend.dummy_prefix}


# --- "gpt2": byte-level BPE --------------------------------------------------------------------
def bpe_from_gguf(meta: dict[str, Any]) -> HfBackend:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = _strings(meta, "tokens")
    types = _token_types(meta, len(tokens))
    merges = [_split_merge(m) for m in _strings(meta, "merges")]
    pre = meta.get(K + "pre")
    try:
        model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                           ignore_merges=pre in _IGNORE_MERGES)
    except Exception as e:  # noqa: BLE001 (`tokenizers` raises plain Exceptions)
        raise MiniCPMError(f"GGUF tokenizer: cannot build a BPE model ({e})") from None
    tokenizer = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre_regexes(pre)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    backend = HfBackend(tokenizer)
    backend.add_tokens([t for _, t in sorted(added_from_types(tokens, types).items())])
    return backend


def bpe_to_gguf(backend: HfBackend, pre: str | None) -> dict[str, Any]:
    data = json.loads(backend.tok.to_str())
    model, decoder = data["model"], data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise MiniCPMError("only byte-level BPE tokenizer.json files can be written as a GGUF "
                           "'gpt2' tokenizer")
    tokens, types = [], []
    for i in range(len(backend)):
        token, added = backend.token_of(i), backend.added.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        if token is None:
            types.append(UNUSED)
        elif added is None:
            types.append(NORMAL)
        else:
            types.append(CONTROL if added.special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {K + "model": "gpt2", K + "pre": pre or detect_pre(data.get("pre_tokenizer")),
            K + "tokens": tokens, K + "token_type": types, K + "merges": merges,
            K + "add_space_prefix": False}


def detect_pre(pre_tokenizer: dict | None) -> str:
    """The llama.cpp `pre` name whose regexes split as this tokenizer.json pre-tokenizer does."""
    regexes = [_HF_SPELLINGS.get(r, r) for r in _pre_tokenizer_regexes(pre_tokenizer)]
    for name, expected in PRE_REGEXES.items():
        if regexes == expected:
            return name
    raise MiniCPMError(f"the pre-tokenizer {json.dumps(pre_tokenizer)[:200]} matches no "
                       f"llama.cpp 'tokenizer.ggml.pre' we know ({', '.join(PRE_REGEXES)})")


def _pre_tokenizer_regexes(data: dict | None) -> list[str]:
    if not data:
        return []
    kind = data.get("type")
    if kind == "Sequence":
        return [r for sub in data["pretokenizers"] for r in _pre_tokenizer_regexes(sub)]
    if kind == "ByteLevel":
        return [_GPT2] if data.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if data.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and data.get("behavior") == "Isolated" and not data.get("invert"):
        pattern = data["pattern"]
        return [pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"])]
    raise MiniCPMError(f"pre-tokenizer {kind!r} has no llama.cpp equivalent")


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp: split at the first space after the first character.
    pos = merge.find(" ", 1)
    if pos < 0:
        raise MiniCPMError(f"GGUF tokenizer: merge {merge!r} has no space")
    return merge[:pos], merge[pos + 1:]


def _token_types(meta: dict[str, Any], n: int) -> list[int]:
    types = [int(t) for t in meta.get(K + "token_type") or [NORMAL] * n]
    return [t if NORMAL <= t <= BYTE else NORMAL for t in types]  # 0 / 7 (undefined): normal


def _strings(meta: dict[str, Any], key: str) -> list[str]:
    value = meta.get(K + key)
    if value is None:
        raise MiniCPMError(f"GGUF tokenizer metadata has no {K + key}")
    return [str(v) for v in value]


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
