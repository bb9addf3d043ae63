"""The two tokenization engines behind `Tokenizer`, with one small interface.

- `SpmBackend`: a SentencePiece model (tokenizer.model, or one rebuilt from GGUF pieces) run by
  the `sentencepiece` library itself, so ids are exactly the original SPM's. Added tokens
  (`<s>`, `<|im_start|>`, ...) are cut out of the text first, as transformers' slow
  LlamaTokenizer does, and every piece of text between them is encoded on its own; with
  `legacy=True` (MiniCPM) each such piece gets SentencePiece's dummy-prefix space.
  Decoding follows transformers' fast Llama decoder: "▁" -> " ", runs of `<0xXX>` byte pieces
  -> UTF-8, then one leading space dropped; an invalid byte becomes one U+FFFD, as in
  sentencepiece (transformers replaces every byte of a run that has one).
- `HfBackend`: a `tokenizers.Tokenizer` (tokenizer.json, or a byte-level BPE rebuilt from GGUF),
  which already handles its added tokens, pre-tokenizer and decoder.

Both encode without BOS/EOS and decode every id they are given; `Tokenizer` adds BOS/EOS and
drops special tokens.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from minicpm.errors import MiniCPMError

SPIECE_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class AddedToken:
    """One entry of `added_tokens_decoder` (same fields as transformers' AddedToken)."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict | str, special: bool = True) -> AddedToken:
        if isinstance(value, str):
            return cls(value, special=special)
        fields = {k: value[k] for k in ("special", "lstrip", "rstrip", "normalized", "single_word")
                  if k in value}
        return cls(str(value["content"]), **fields)


class SpmBackend:
    kind = "spm"

    def __init__(self, model_proto: bytes, added: dict[int, AddedToken], legacy: bool = True,
                 source: str = "tokenizer.model"):
        import sentencepiece as spm

        self.proto = model_proto
        self.added = dict(sorted(added.items()))
        self.legacy = legacy
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise MiniCPMError(f"{source}: not a valid SentencePiece model ({e})") from None
        self.n_pieces = self.sp.get_piece_size()
        self.dummy_prefix = _normalizer_flag(model_proto, "add_dummy_prefix")
        # legacy=False: only the start of the text gets the dummy prefix (transformers' non-legacy
        # Llama), so text after an added token is encoded by a copy without it.
        self.sp_bare = self.sp if legacy else _without_dummy_prefix(model_proto)
        self._content_to_id = {t.content: i for i, t in self.added.items()}
        self._splitter = _added_token_regex(self.added.values())

    def __len__(self) -> int:
        return max(self.n_pieces, max(self.added, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for start, piece, token_id in self._segments(text):
            if token_id is not None:
                ids.append(token_id)
            elif piece:
                sp = self.sp if self.legacy or start == 0 else self.sp_bare
                ids += sp.encode(piece)
        return ids

    def _segments(self, text: str):
        """(offset, text, None) for plain text and (offset, content, id) for added tokens, in
        order. An added token with `lstrip`/`rstrip` swallows the whitespace on that side."""
        if self._splitter is None:
            yield 0, text, None
            return
        pos, previous = 0, None
        for match in self._splitter.finditer(text):
            token_id = self._content_to_id[match.group()]
            before = text[pos:match.start()]
            if self.added[token_id].lstrip:
                before = before.rstrip()
            if previous is not None and previous.rstrip:
                before = before.lstrip()
            yield pos, before, None
            yield match.start(), match.group(), token_id
            pos, previous = match.end(), self.added[token_id]
        rest = text[pos:]
        yield pos, rest.lstrip() if previous is not None and previous.rstrip else rest, None

    def token_of(self, token_id: int) -> str | None:
        if token_id in self.added:
            return self.added[token_id].content
        if 0 <= token_id < self.n_pieces:
            return self.sp.id_to_piece(token_id)
        return None

    def id_of(self, token: str) -> int | None:
        if token in self._content_to_id:
            return self._content_to_id[token]
        token_id = self.sp.piece_to_id(token)
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def decode(self, ids: list[int]) -> str:
        pieces = [p for p in map(self.token_of, ids) if p is not None]
        text = _fuse_byte_pieces([p.replace(SPIECE_SPACE, " ") for p in pieces])
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.proto)


class HfBackend:
    kind = "hf"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.added = {i: AddedToken(t.content, t.special, t.lstrip, t.rstrip, t.normalized,
                                    t.single_word)
                      for i, t in sorted(tokenizer.get_added_tokens_decoder().items())}

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_of(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id) if token_id >= 0 else None

    def id_of(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        # `tokenizers` skips ids past the vocabulary but cannot take negative ones
        return self.tok.decode([i for i in ids if i >= 0], skip_special_tokens=False)

    def add_tokens(self, tokens: list[AddedToken]) -> None:
        """Add tokens to the added vocabulary (an existing token keeps its id)."""
        from tokenizers import AddedToken as HfAddedToken

        for t in tokens:
            hf = HfAddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip,
                              rstrip=t.rstrip, normalized=t.normalized, special=t.special)
            (self.tok.add_special_tokens if t.special else self.tok.add_tokens)([hf])
        self.added = HfBackend(self.tok).added

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


# --- helpers ---------------------------------------------------------------------------------
def _added_token_regex(tokens) -> re.Pattern | None:
    # Longest first, so that at any position the longest added token wins (as transformers' trie).
    contents = sorted({t.content for t in tokens if t.content}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, contents))) if contents else None


def _fuse_byte_pieces(pieces: list[str]) -> str:
    """Join pieces, turning each run of `<0xXX>` pieces into the UTF-8 text it spells."""
    out: list[str] = []
    run = bytearray()
    for piece in pieces + [""]:  # the sentinel flushes a final run
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            run.append(int(byte.group(1), 16))
            continue
        if run:
            out.append(_utf8_per_byte(bytes(run)))
            run = bytearray()
        out.append(piece)
    return "".join(out)


def _utf8_per_byte(data: bytes) -> str:
    """UTF-8 text with one U+FFFD per invalid byte, as sentencepiece decodes byte pieces.

    (transformers' fast decoder replaces every byte of a run that is not all valid; keeping the
    valid characters is also what lets a stream show them before the run ends.)"""
    out, pos = [], 0
    while True:
        try:
            out.append(data[pos:].decode("utf-8"))
            return "".join(out)
        except UnicodeDecodeError as e:
            out.append(data[pos:pos + e.start].decode("utf-8") + "\ufffd" * (e.end - e.start))
            pos += e.end


def load_proto(model_proto: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    return proto


def _normalizer_flag(model_proto: bytes, name: str) -> bool:
    return bool(getattr(load_proto(model_proto).normalizer_spec, name))


def _without_dummy_prefix(model_proto: bytes):
    import sentencepiece as spm

    proto = load_proto(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
