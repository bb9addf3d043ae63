"""The pure function that picks the next token, and the sampling state of some sequences.

`SamplingParams` (in `params`, which needs no PyTorch) validates everything a user can pass;
`sample_next` turns one step's logits into token ids with an explicit random generator, so a
seed reproduces a run exactly. Temperature 0 means greedy. `Sampler` holds the state of
sampling some sequences (generator, penalty history): `generate()` and the serving engine both
sample through it, so there is one implementation of every rule. `token_logprob` and
`prompt_logprobs` report log-probabilities of the model's raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minicpm.generation.params import SamplingParams, require

__all__ = ["SamplingParams", "Sampler", "sample_next", "check_vocabulary"]


def check_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """The token ids the settings name (logit_bias) exist in a vocabulary of `vocab_size`."""
    outside = sorted(t for t in params.logit_bias or {} if t >= vocab_size)
    require(not outside, f"logit_bias names token id {outside[0] if outside else 0}, outside the "
                        f"vocabulary (size {vocab_size})")


def make_generator(seed: int | None, device: Any = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from fp32 logits [B, V]; `seen` [B, V] marks tokens for the repetition
    penalty, `counts` [B, V] (fp32) counts generated tokens for the presence/frequency ones."""
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = apply_presence_frequency(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        probs = keep_nucleus(probs, params.top_p)
    return draw(probs, generator)


def keep_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p.

    Ranks only the top candidates, as many as hold that mass (64 usually do): sorting a whole
    49k-token row took 4 ms, longer than a decode step of a small model.
    """
    threshold = top_p * probs.sum(-1, keepdim=True)
    vocab, k = probs.shape[-1], 64
    while True:
        values, ids = probs.topk(min(k, vocab), dim=-1)  # best first
        if k >= vocab or bool((values.sum(-1, keepdim=True) >= threshold).all()):
            break  # every token past these has at least their mass ranked above it
        k *= 4
    before = values.cumsum(-1) - values  # mass of the tokens ranked above
    return torch.zeros_like(probs).scatter_(-1, ids, values.masked_fill(before >= threshold, 0.0))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V] (unnormalised, >= 0) by the inverse of its cumulative
    sum at one uniform number: torch.multinomial took 1.3 ms for a 49k-token row, this 0.07."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)
    # u rounded up to the total: take the last token with mass instead of one without
    missed = probs.gather(-1, ids) == 0
    if bool(missed.any()):
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
        ids = torch.where(missed, last, ids)
    return ids.squeeze(-1)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: each listed token's logit plus its bias (-100 bans it in practice)."""
    ids = torch.tensor(list(bias), device=logits.device)
    return logits.index_add(-1, ids, torch.tensor(list(bias.values()), dtype=logits.dtype,
                                                   device=logits.device).expand(logits.shape[0], -1))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL/Hugging Face rule: seen tokens' positive logits divided, negative multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's rule: logit - presence * (count > 0) - frequency * count."""
    return logits - presence * (counts > 0).float() - frequency * counts


class Sampler:
    """The sampling state of a batch of sequences: their parameters, a random generator, and
    the token history the penalties read (the repetition penalty covers the prompt too, as
    Hugging Face's does; presence/frequency count generated tokens only, as OpenAI's do).

    `generate()` samples a whole left-padded batch with one Sampler; the serving engine gives
    every request its own one-row Sampler, so a seeded request draws the same numbers however
    many others run beside it.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompts: list[list[int]],
                 device: Any = "cpu"):
        check_vocabulary(params, vocab_size)
        self.params = params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, prompt] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(len(prompts), vocab_size, device=device)

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits (so a whole batch of such rows takes one argmax)."""
        return self.params.greedy and not self.params.adjusts_logits

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row [B] from fp32 logits [B, V]."""
        return sample_next(logits, self.params, self.generator, self.seen, self.counts)

    def observe(self, tokens: torch.Tensor | list[int]) -> None:
        """Record each row's new token [B] for the penalties (nothing to do without them: this
        runs for every token of every sequence)."""
        if self.seen is None and self.counts is None:
            return
        tokens = torch.as_tensor(tokens)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (id, logprob), best first


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """Log-probability of `token` under raw fp32 logits [V] (before penalties and temperature)
    and the top-k alternatives."""
    return _logprobs(torch.log_softmax(logits, dim=-1), token, k)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """For logits [S, V] of consecutive positions, the logprob of each position's next token
    targets[i] (len(targets) <= S) and its top-k. Callers pass a prompt chunk at a time, so a
    long prompt never holds [prompt_len, V] log-probabilities at once."""
    logprobs = torch.log_softmax(logits[:len(targets)], dim=-1)
    return [_logprobs(row, token, k) for row, token in zip(logprobs, targets)]


def _logprobs(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top = []
    if k:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)
