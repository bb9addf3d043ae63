"""Incremental detokenization: text for each new token id, as it becomes final.

Decoding one token at a time is wrong for two reasons: a character may be spread over several
byte tokens (byte-level BPE, SentencePiece byte fallback), and SentencePiece drops the space of
the first piece of a decoded sequence. So, like vLLM, we decode a short window twice: the
tokens already shown that precede the new ones (`prefix`), and the same with the new tokens
added. The new text is the difference; both decodes start at the same token, so whatever the
decoder does to the start of a sequence cancels out. While the window's text ends in U+FFFD (an
unfinished UTF-8 sequence) we show nothing and wait for more tokens; `flush()` shows the rest.

With `skip_special_tokens`, special ids are dropped as they arrive: decoding with the flag drops
them before the decoder runs, so the windows must never contain them.
The concatenation of every `push()` and the final `flush()` equals `decode(all ids)`.
"""

from __future__ import annotations


class StreamDecoder:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self.ids: list[int] = []  # the tokens shown last (context), then those not shown yet
        self.shown = 0  # how many of `ids` are context

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is unfinished)."""
        token_id = int(token_id)
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        prefix, text = self._window()
        if text.endswith("\ufffd"):
            return ""  # maybe an unfinished character: wait for its next byte
        return self._advance(prefix, text)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character comes out as U+FFFD)."""
        if self.shown == len(self.ids):
            return ""
        return self._advance(*self._window())

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.backend.decode
        return decode(self.ids[:self.shown]), decode(self.ids)

    def _advance(self, prefix: str, text: str) -> str:
        # The tokens shown now are the context of the next window; older ones are dropped.
        self.ids = self.ids[self.shown:]
        self.shown = len(self.ids)
        return text[len(prefix):]
