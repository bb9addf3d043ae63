"""JSON mode: constrain generation so that the reply is exactly one JSON object (RFC 8259).

A small pushdown automaton reads the reply character by character. Its state is an immutable
tuple, so trying a token (`allows`) runs the token's characters on the current state without
copying anything, and the vocabulary-wide mask (`allowed_mask`) can be cached per state: inside
a string, or between values, the same few states come back again and again.

Token texts are computed once per tokenizer: each token is decoded after a fixed one-letter
prefix, because SentencePiece drops the leading space of the first piece of a decoded sequence
and a token's text must be what it adds in the middle of a reply. Tokens that are not whole
UTF-8 characters on their own (byte-fallback pieces, partial byte-level BPE tokens) decode to
U+FFFD and are never allowed: characters outside the vocabulary's whole-character tokens come
out as \\uXXXX escapes instead. Special tokens are never allowed; end-of-sequence only once the
object is complete (the engine finishes a reply at that point anyway).

Nothing can make a model close its object before the token limit: a reply cut by max_tokens
ends with finish_reason "length" and is not valid JSON, as with OpenAI's JSON mode.
"""

from __future__ import annotations

import weakref

import torch

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
MAX_CACHED_MASKS = 256

# A state is (mode, stack, extra): `stack` holds the open containers ("{" / "["), `extra` is
# what a mode needs to remember (the rest of a literal, hex digits left in a \u escape).
START = ("start", (), "")
# modes: start, done, value (a value must come), first_value (after "[": a value or "]"),
#        key (after ",": a key must come), first_key (after "{": a key or "}"), colon,
#        after (a value ended: "," or a closer), string, key_string, escape, unicode,
#        literal, and the number modes int0, int, dot, frac, exp, exp_sign, exp_digits, minus.


def step(state: tuple, ch: str) -> tuple | None:
    """The state after `ch`, or None if `ch` cannot come next."""
    mode, stack, extra = state
    if mode in ("string", "key_string"):
        if ch == '"':
            return ("colon", stack, "") if mode == "key_string" else _value_done(stack)
        if ch == "\\":
            return ("escape", stack, mode)
        return None if ch < " " else state  # control characters must be escaped
    if mode == "escape":
        if ch in '"\\/bfnrt':
            return (extra, stack, "")
        return ("unicode", stack, extra + ":4") if ch == "u" else None
    if mode == "unicode":
        string_mode, left = extra.split(":")
        if ch not in HEX:
            return None
        left = int(left) - 1
        return (string_mode, stack, "") if left == 0 else ("unicode", stack, f"{string_mode}:{left}")
    if mode == "literal":
        if ch != extra[0]:
            return None
        return _value_done(stack) if len(extra) == 1 else ("literal", stack, extra[1:])
    if mode in NUMBER_MODES:
        return _number_step(mode, stack, ch)
    if ch in WHITESPACE:
        return state  # whitespace between tokens, everywhere outside strings and numbers
    if mode == "start":
        return ("first_key", ("{",), "") if ch == "{" else None
    if mode == "done":
        return None
    if mode in ("first_key", "key"):
        if ch == '"':
            return ("key_string", stack, "")
        return _close(stack, ch) if mode == "first_key" and ch == "}" else None
    if mode == "colon":
        return ("value", stack, "") if ch == ":" else None
    if mode == "after":
        if ch == ",":
            return ("key", stack, "") if stack[-1] == "{" else ("value", stack, "")
        return _close(stack, ch)
    if mode == "first_value" and ch == "]":
        return _close(stack, ch)
    return _value_start(stack, ch)  # value, first_value


def _value_start(stack: tuple, ch: str) -> tuple | None:
    if ch == '"':
        return ("string", stack, "")
    if ch == "{":
        return ("first_key", stack + ("{",), "")
    if ch == "[":
        return ("first_value", stack + ("[",), "")
    if ch in LITERALS:
        return ("literal", stack, LITERALS[ch])
    if ch == "-":
        return ("minus", stack, "")
    if ch == "0":
        return ("int0", stack, "")
    if ch in DIGITS:
        return ("int", stack, "")
    return None


def _value_done(stack: tuple) -> tuple:
    return ("after", stack, "") if stack else ("done", (), "")


def _close(stack: tuple, ch: str) -> tuple | None:
    if not stack or {"}": "{", "]": "["}.get(ch) != stack[-1]:
        return None
    return _value_done(stack[:-1])


# number modes: what may follow, and whether the number may end there
NUMBER_MODES = {"minus", "int0", "int", "dot", "frac", "exp", "exp_sign", "exp_digits"}
NUMBER_CAN_END = {"int0", "int", "frac", "exp_digits"}


def _number_step(mode: str, stack: tuple, ch: str) -> tuple | None:
    if ch in DIGITS:
        nxt = {"minus": "int0" if ch == "0" else "int", "int": "int", "dot": "frac", "frac": "frac",
               "exp": "exp_digits", "exp_sign": "exp_digits", "exp_digits": "exp_digits"}.get(mode)
        return (nxt, stack, "") if nxt else None  # "int0": no leading zeros
    if ch == "." and mode in ("int0", "int"):
        return ("dot", stack, "")
    if ch in "eE" and mode in ("int0", "int", "frac"):
        return ("exp", stack, "")
    if ch in "+-" and mode == "exp":
        return ("exp_sign", stack, "")
    if mode in NUMBER_CAN_END:  # the number ended; this character follows it
        return step(("after", stack, ""), ch)
    return None


def run(state: tuple | None, text: str) -> tuple | None:
    for ch in text:
        if state is None:
            return None
        state = step(state, ch)
    return state


class TokenTexts:
    """Each token id's text as it appears mid-reply (None: never allowed), built once."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer) -> list[str | None]:
        try:
            return cls._cache[tokenizer]
        except (KeyError, TypeError):
            texts = cls._build(tokenizer)
            try:
                cls._cache[tokenizer] = texts
            except TypeError:  # not weak-referenceable: rebuilt per constraint
                pass
            return texts

    @staticmethod
    def _build(tokenizer) -> list[str | None]:
        special = set(tokenizer.special_token_ids)
        prefix = tokenizer.encode("a", add_special_tokens=False)[-1:]
        decode = tokenizer.backend.decode if hasattr(tokenizer, "backend") else tokenizer.decode
        base = decode(prefix)
        texts: list[str | None] = []
        for token_id in range(tokenizer.vocab_size):
            if token_id in special:
                texts.append(None)
                continue
            text = decode(prefix + [token_id])
            text = text[len(base):] if text.startswith(base) else None
            texts.append(None if not text or "\ufffd" in text else text)
        return texts


class JsonObjectConstraint:
    """Which next tokens keep the reply a valid prefix of one JSON object (see the module doc)."""

    def __init__(self, tokenizer):
        self.texts = TokenTexts.of(tokenizer)
        self.vocab_size = len(self.texts)
        self.eos_ids = set(tokenizer.stop_token_ids) | ({tokenizer.eos_token_id} - {None})
        self.state: tuple = START
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def complete(self) -> bool:
        return self.state[0] == "done"

    def allows(self, token_id: int) -> bool:
        if token_id in self.eos_ids:
            return self.complete
        if not 0 <= token_id < self.vocab_size or self.texts[token_id] is None:
            return False
        return run(self.state, self.texts[token_id]) is not None

    def advance(self, token_id: int) -> None:
        if token_id in self.eos_ids:
            return
        text = self.texts[token_id] if 0 <= token_id < self.vocab_size else None
        state = run(self.state, text) if text is not None else None
        if state is None:
            raise ValueError(f"token {token_id} ({text!r}) does not continue the JSON reply")
        self.state = state

    def allowed_mask(self) -> torch.Tensor:
        """bool [vocab]: the tokens `allows` accepts now (cached per automaton state)."""
        mask = self._masks.get(self.state)
        if mask is None:
            mask = torch.tensor([self.allows(t) for t in range(self.vocab_size)], dtype=torch.bool)
            if len(self._masks) >= MAX_CACHED_MASKS:
                self._masks.clear()
            self._masks[self.state] = mask
        return mask
