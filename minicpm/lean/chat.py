"""Generation and chat on the lean runtime: the same settings (`SamplingParams`, the official chat
defaults of `chat_params`), stop rules and streamed text (`RowText`) as the PyTorch generator,
with the next token drawn by numpy.

Sampling follows `minicpm.generation.sampling.sample_next` rule for rule (logit bias, the
repetition penalty over prompt and reply, presence/frequency over the reply, temperature, top-k,
min-p, top-p, one uniform number through the cumulative sum); the random numbers are numpy's, so
a seed reproduces a lean run, not a PyTorch one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.generation.chat import TEXT_ONLY, chat_params
from minicpm.generation.params import SamplingParams
from minicpm.generation.prompts import common_prefix, fit_prompt
from minicpm.generation.text import GenerationStats, stream_tokens, with_chat_stop_ids
from minicpm.lean.model import LeanModel


class Sampler:
    """Draws next tokens for one sequence; `seen`/`counts` feed the penalties."""

    def __init__(self, params: SamplingParams, vocab: int, prompt: list[int]):
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise MiniCPMError(f"logit_bias names token id {outside[0]}, outside the vocabulary (size {vocab})")
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab, bool)
        self.seen[prompt] = True
        self.counts = np.zeros(vocab, np.float32)

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        for token, bias in (p.logit_bias or {}).items():
            logits[token] += bias
        if p.repetition_penalty != 1.0:
            penalised = np.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = np.where(self.seen, penalised, logits)
        if p.presence_penalty or p.frequency_penalty:
            logits -= p.presence_penalty * (self.counts > 0) + p.frequency_penalty * self.counts
        if p.greedy:
            return int(np.argmax(logits))
        logits = logits / np.float32(p.temperature)
        if p.top_k:
            kth = np.partition(logits, -min(p.top_k, logits.size))[-min(p.top_k, logits.size)]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.min_p:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_p < 1.0:
            probs = _nucleus(probs, p.top_p)
        return _draw(probs, self.rng)

    def observe(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """All but the smallest set of most likely tokens whose mass reaches top_p zeroed. Ranks
    only as many candidates as hold that mass (64 usually do): sorting a whole 49k vocabulary
    cost 4 ms a token, a third of a decode step of the default model."""
    threshold, k = top_p * probs.sum(), 64
    while True:
        ids = np.argpartition(-probs, k - 1)[:k] if k < probs.size else np.arange(probs.size)
        if k >= probs.size or probs[ids].sum() >= threshold:
            break  # every token past these has at least their mass ranked above it
        k *= 4
    ids = ids[np.argsort(-probs[ids], kind="stable")]
    ranked = probs[ids]
    keep = np.cumsum(ranked) - ranked < threshold  # the mass ranked above each one
    out = np.zeros_like(probs)
    out[ids[keep]] = ranked[keep]
    return out


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs, dtype=np.float64)
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if token >= probs.size or probs[token] == 0:  # rounded up to the total: the last token with mass
        token = int(np.flatnonzero(probs)[-1])
    return token


def stream_reply(model: LeanModel, tokenizer, prompt: list[int], params: SamplingParams,
                 stats: GenerationStats | None = None) -> Iterator[str]:
    """The reply to `prompt` piece by piece; what the cache already holds of it is not run again."""
    stats = stats if stats is not None else GenerationStats()
    params = with_chat_stop_ids(model, tokenizer, params)
    context = model.config.max_position_embeddings
    prompt = fit_prompt(list(prompt), context)
    budget = min(params.max_new_tokens or context, context - len(prompt))
    stop_ids = set(params.stop_token_ids)
    start = min(common_prefix(model.tokens, prompt), len(prompt) - 1)
    stats.prompt_tokens, stats.cached_prompt_tokens = len(prompt), model.cache.resumable(start, model.length)

    def tokens() -> Iterator[int]:
        logits = model.forward(prompt[start:], start)
        sampler = Sampler(params, logits.size, prompt)
        for step in range(budget):
            token = sampler.sample(logits)
            sampler.observe(token)
            yield token
            if step + 1 < budget:
                logits = model.forward([token], model.length)

    yield from stream_tokens(tokens(), tokenizer, params, stop_ids, stats)


class LeanChat:
    """A text conversation for `minicpm chat`'s loop (minicpm.cli.repl): the chat template's
    history; the KV cache keeps what the next prompt shares with the last."""

    image = None  # text models only

    def __init__(self, model: LeanModel, tokenizer, system: str | None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def set_image(self, path: str | None) -> str:
        raise MiniCPMError(TEXT_ONLY)

    def reply(self, query: str, sampling: dict, stats: GenerationStats) -> Iterator[str]:
        messages = self.history + [{"role": "user", "content": query}]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        params = chat_params(len(prompt), self.model.config.max_position_embeddings, **sampling)
        return stream_reply(self.model, self.tokenizer, prompt, params, stats)

    def record(self, query: str, reply: str) -> None:
        self.history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
