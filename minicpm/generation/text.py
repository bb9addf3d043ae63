"""From token ids to text: streaming detokenization with stop strings.

Stop strings can span token boundaries, so while streaming we hold back any tail of the text
that could still grow into a stop string, and release it once it cannot. The stop string itself
is never shown. Only `stream_text` and `generate_texts` run the PyTorch generator (imported
there): the rest serves the torch-free runtime (`minicpm.lean`) too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from minicpm.generation.params import SamplingParams

if TYPE_CHECKING:
    from minicpm.generation.generate import PromptCache


class StopStringFilter:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to show now; sets `stopped` when a stop string completed."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = self._held_suffix()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of `pending` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class RowText:
    """Text of one generated row: incremental decoding plus stop strings."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.filter = StopStringFilter(stops)
        self.text = ""

    def push(self, token: int) -> str:
        piece = self.filter.push(self.decoder.push(token))
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = "" if self.filter.stopped else self.filter.push(self.decoder.flush())
        piece += self.filter.flush()
        self.text += piece
        return piece

    @property
    def stopped(self) -> bool:
        return self.filter.stopped


def with_chat_stop_ids(model, tokenizer, params: SamplingParams) -> SamplingParams:
    """Unless the caller chose stop ids, stop at the config's eos ids and at the tokenizer's
    end-of-turn tokens too (a ChatML turn ends with <|im_end|>, which need not be the eos)."""
    if params.stop_token_ids is not None:
        return params
    ids = sorted(set(model.config.eos_token_ids) | set(tokenizer.stop_token_ids))
    return dataclasses.replace(params, stop_token_ids=ids)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # taken from a prompt cache instead of being run again
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    tokens: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1  # the first token comes out of prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def stream_text(model, tokenizer, prompt_ids: list[int], params: SamplingParams,
                stats: GenerationStats | None = None, prompt_cache: PromptCache | None = None,
                penalize_prompt: bool = True) -> Iterator[str]:
    """Yield the reply's text piece by piece; fills `stats` as it goes. `penalize_prompt`:
    see TokenGenerator."""
    from minicpm.generation.generate import TokenGenerator

    stats = stats if stats is not None else GenerationStats()
    params = with_chat_stop_ids(model, tokenizer, params)
    gen = TokenGenerator(model, [prompt_ids], params, pad_token_id=tokenizer.pad_token_id,
                         prompt_cache=prompt_cache, penalize_prompt=penalize_prompt)
    stats.prompt_tokens = len(gen.prompts[0])

    def tokens() -> Iterator[int]:
        for step in gen:
            stats.cached_prompt_tokens = gen.reused_tokens
            yield step[0]

    yield from stream_tokens(tokens(), tokenizer, params, gen.stop_ids, stats)
    if stats.finish_reason == "stop":
        gen.finish(0)


def stream_tokens(tokens: Iterator[int], tokenizer, params: SamplingParams, stop_ids, stats: GenerationStats
                  ) -> Iterator[str]:
    """The text of generated `tokens` piece by piece, until a stop id or stop string (the
    iterator is not resumed after it); fills `stats` (its clock starts now: prefill is the wait
    for the first token). Shared with the lean runtime."""
    row = RowText(tokenizer, params.stop)
    start = last = time.perf_counter()
    for token in tokens:
        now = time.perf_counter()
        if stats.new_tokens == 0:
            stats.prefill_seconds = now - start
        else:
            stats.decode_seconds += now - last
        last = now
        stats.new_tokens += 1
        stats.tokens.append(token)
        if token in stop_ids:
            stats.finish_reason = "stop"
            break
        piece = row.push(token)
        if piece:
            yield piece
        if row.stopped:
            stats.finish_reason = "stop"
            break
    tail = row.flush()
    if tail:
        yield tail


def generate_texts(model, tokenizer, prompts: list[list[int]], params: SamplingParams) -> list[str]:
    """Batched generation of full replies (each row stops on its own stop token or string)."""
    from minicpm.generation.generate import TokenGenerator

    params = with_chat_stop_ids(model, tokenizer, params)
    gen = TokenGenerator(model, prompts, params, pad_token_id=tokenizer.pad_token_id)
    rows = [RowText(tokenizer, params.stop) for _ in prompts]
    for step in gen:
        for i, token in enumerate(step):
            if token is None or token in gen.stop_ids:
                continue
            rows[i].push(token)
            if rows[i].stopped:
                gen.finish(i)
    for row in rows:
        row.flush()
    return [row.text for row in rows]
