"""Log-likelihood of continuations, lm-eval's way of tokenizing, with the context run once.

Tokenization (lm-eval's `_encode_pair`, lm_eval/api/model.py): trailing spaces of the context move
to the front of the continuation; the context's ids are enc(context), the continuation's are
enc(context + continuation)[len(enc(context)):]; no special tokens. An empty context is the prefix
token (BOS, else EOS) and the continuation is encoded alone.

Scoring: the choices of one question share their context, so the context is prefilled once into
a KV cache, the cache rows are forked (`KVCache.fork_rows`) one per choice, and only the
continuations run, all choices of a batch of questions in one padded forward pass. Questions are
batched longest first (contexts left-padded). The first continuation token is scored from the
context's last logits; a one-token continuation needs no second pass at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minicpm.errors import MiniCPMError
from minicpm.generation.generate import left_pad


@dataclass
class Question:
    """One context and its continuations, as token ids."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    logprob: float        # sum of the continuation tokens' log-probabilities
    greedy: bool          # every continuation token was the argmax


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prefix_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise MiniCPMError("an empty context is scored after the BOS (or EOS) token; the tokenizer has neither")
    return token


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` (with its empty-context rule)."""
    if context == "":
        return [prefix_token_id(tokenizer)], encode(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):]


def encode_question(tokenizer, context: str, continuations: list[str], max_len: int) -> Question:
    """The shared context ids and each continuation's ids; a context too long for the model
    loses its first tokens (as lm-eval truncates from the left)."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    context_ids = pairs[0][0]
    conts = [cont for _, cont in pairs]
    for i, cont in enumerate(conts):
        if not cont:
            raise MiniCPMError(f"continuation {continuations[i]!r} is empty after tokenization")
    longest = max(map(len, conts))
    if longest >= max_len:
        raise MiniCPMError(f"a continuation of {longest} tokens does not fit the model's {max_len}-token context")
    keep = max_len - longest
    return Question(context_ids[-keep:], conts)


@torch.inference_mode()
def score_questions(model, questions: list[Question], batch_size: int = 8, pad_id: int = 0,
                    progress: Callable[[int], None] | None = None) -> list[list[Score]]:
    """The scores of every continuation of every question (in the order given)."""
    if batch_size < 1:
        raise MiniCPMError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(questions)), key=lambda i: -(len(questions[i].context) +
                                                          max(map(len, questions[i].continuations))))
    scores: list[list[Score] | None] = [None] * len(questions)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, result in zip(chunk, _score_batch(model, [questions[i] for i in chunk], pad_id)):
            scores[i] = result
        if progress is not None:
            progress(len(chunk))
    return scores


def _score_batch(model, questions: list[Question], pad_id: int) -> list[list[Score]]:
    device = model.device
    ids, mask = left_pad([q.context for q in questions], pad_id, device)
    padded = not bool(mask.all())
    rows = [row for row, q in enumerate(questions) for _ in q.continuations]
    conts = [c for q in questions for c in q.continuations]
    width = max(map(len, conts)) - 1  # continuation tokens that are model inputs

    cache = model.new_cache(len(questions), ids.shape[1] + width)
    last = model(ids, attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]
    row_index = torch.tensor(rows, device=device)
    firsts = torch.tensor([c[0] for c in conts], device=device)
    logprobs = [_token_logprobs(last[row_index][:, None], firsts[:, None, None])]  # [N, 1] each
    if width > 0:
        inputs = torch.full((len(conts), width), pad_id, dtype=torch.long, device=device)
        targets = torch.full((len(conts), width), pad_id, dtype=torch.long, device=device)
        for n, cont in enumerate(conts):
            inputs[n, :len(cont) - 1] = torch.tensor(cont[:-1])
            targets[n, :len(cont) - 1] = torch.tensor(cont[1:])
        # right padding needs no mask (no real token attends to a later one); left padding does
        full_mask = torch.cat([mask[row_index], mask.new_ones(len(conts), width)], 1) if padded else None
        logits = model(inputs, attention_mask=full_mask, cache=cache.fork_rows(row_index))
        logprobs.append(_token_logprobs(logits, targets[..., None]))
    token_lp = torch.cat([lp for lp, _ in logprobs], 1)
    token_greedy = torch.cat([g for _, g in logprobs], 1)
    out: list[list[Score]] = [[] for _ in questions]
    for n, (row, cont) in enumerate(zip(rows, conts)):
        k = len(cont)
        out[row].append(Score(float(token_lp[n, :k].double().sum()), bool(token_greedy[n, :k].all())))
    return out


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits)[target] and whether the target is the argmax, at every position
    (logits [..., V], targets [..., 1]); without materialising the whole log-softmax."""
    logits = logits.float()
    chosen = logits.gather(-1, targets)
    logprob = (chosen - torch.logsumexp(logits, -1, keepdim=True))[..., 0]
    greedy = (chosen >= logits.max(-1, keepdim=True).values)[..., 0]
    return logprob, greedy
