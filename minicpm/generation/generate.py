"""The lockstep token generator behind `generate()`, `chat()` and the CLI's chat/generate.

`TokenGenerator` works on token ids only (no tokenizer): it left-pads a batch of prompts,
prefills them in chunks into a fixed-size KV cache, then decodes one token per step for every
row still running, yielding the new token of each row. A row stops at a stop token id, or when
the caller calls `finish(row)` (for example when its text hit a stop string).

The server does not use it: its continuous batching (`minicpm.serving.engine`) lets requests
join and leave between steps, each in its own KV-cache slot. Both sample through the same
`Sampler`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from minicpm.cache import KVCache
from minicpm.errors import MiniCPMError
from minicpm.generation.prompts import common_prefix, fit_prompt
from minicpm.generation.sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # bounds the attention score matrix of long prompts


@dataclass
class PromptCache:
    """A KV cache kept between generations of one conversation, and the ids it holds.

    The next prompt of a chat starts with the previous one plus the reply, so only the tokens
    after the longest common prefix need a prefill.
    """

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)

    def reuse(self, model, prompt: list[int], capacity: int, leave_one: bool = True) -> tuple[KVCache, int]:
        """A cache to continue `prompt` from, and how many of its tokens are already in it
        (`leave_one`: at least its last token is left to run, for the logits that follow it)."""
        if self.cache is None or self.cache.max_len < capacity:
            self.cache = grown(self.cache, model.new_cache(1, capacity), len(self.ids))
        common = common_prefix(self.ids, prompt[:-1] if leave_one else prompt)
        common = self.cache.resumable(min(common, self.cache.length))
        self.cache.length, self.ids = common, prompt[:common]
        return self.cache, common

    @torch.inference_mode()
    def prefill(self, model, ids: list[int], chunk: int = PREFILL_CHUNK) -> int:
        """Run `ids` into the cache (what it holds of them already is kept), so that a later
        prompt that starts with them prefills only what follows. Returns the tokens run."""
        cache, done = self.reuse(model, ids, len(ids), leave_one=False)
        for start in range(done, len(ids), chunk):
            model(torch.tensor([ids[start:start + chunk]], device=model.device), cache=cache, last_only=True)
        self.ids = list(ids)
        return len(ids) - done


def grown(old: KVCache | None, new: KVCache, keep: int) -> KVCache:
    """`new` holding the first `keep` positions of `old` (a conversation outgrew its cache), or
    as many as it can continue after."""
    if old is not None:
        keep = old.resumable(min(keep, old.length))
        new.copy_prefix(old, keep)
        new.length = keep
    return new


class TokenGenerator:
    def __init__(self, model, prompts: list[list[int]], params: SamplingParams,
                 pad_token_id: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 prompt_cache: PromptCache | None = None, penalize_prompt: bool = True):
        """`penalize_prompt=False`: the repetition penalty sees generated tokens only (as
        Hugging Face's does when generating from embeddings, which MiniCPM-V's chat does)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MiniCPMError("every prompt needs at least one token")
        if prompt_cache is not None and len(prompts) != 1:
            raise MiniCPMError("a prompt cache serves one conversation: pass a single prompt")
        config = model.config
        self.model = model
        self.params = params
        self.context = config.max_position_embeddings
        self.prompts = [fit_prompt(list(p), self.context) for p in prompts]
        longest = max(map(len, self.prompts))
        room = self.context - longest
        budget = params.max_new_tokens or room
        if budget > room:
            warnings.warn(f"max_new_tokens {budget} does not fit the {self.context}-token context "
                          f"after a {longest}-token prompt; generating at most {room}", stacklevel=3)
            budget = room
        self.max_new_tokens = budget
        self.stop_ids = set(config.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        self.pad_id = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
        self.finished = [False] * len(prompts)
        self.prefill_chunk = prefill_chunk
        self.prompt_cache = prompt_cache
        self.reused_tokens = 0  # prompt tokens found in the prompt cache (not run again)
        self.penalize_prompt = penalize_prompt

    def finish(self, row: int) -> None:
        self.finished[row] = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        """Per step: the new token of each row, None for rows already finished."""
        if self.max_new_tokens <= 0:
            return
        model, params = self.model, self.params
        device = model.device
        ids, mask = left_pad(self.prompts, self.pad_id, device)
        batch, length = ids.shape
        mask_arg = mask if not bool(mask.all()) else None
        if self.prompt_cache is None:
            cache, done = model.new_cache(batch, length + self.max_new_tokens), 0
        else:
            cache, done = self.prompt_cache.reuse(model, self.prompts[0], length + self.max_new_tokens)
        self.reused_tokens = done
        logits = self._prefill(ids[:, done:], mask_arg, cache)
        penalized = self.prompts if self.penalize_prompt else [[] for _ in self.prompts]
        sampler = Sampler(params, logits.shape[-1], penalized, logits.device)
        for step in range(self.max_new_tokens):
            tokens = sampler.sample(logits)
            sampler.observe(tokens)
            tokens = tokens.to(device)
            out: list[int | None] = []
            for row, token in enumerate(tokens.tolist()):
                if self.finished[row]:
                    out.append(None)
                    continue
                out.append(token)
                if token in self.stop_ids:
                    self.finished[row] = True
            yield out
            if all(self.finished) or step == self.max_new_tokens - 1:
                return
            if mask_arg is not None:
                mask_arg = torch.cat([mask_arg, mask_arg.new_ones(batch, 1)], dim=1)
            logits = model(tokens[:, None], attention_mask=mask_arg, cache=cache)[:, -1]
            if self.prompt_cache is not None:
                self.prompt_cache.ids.append(int(tokens[0]))

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        logits = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            end = start + self.prefill_chunk
            chunk_mask = mask[:, :end] if mask is not None else None
            logits = self.model(ids[:, start:end], attention_mask=chunk_mask, cache=cache, last_only=True)
        if self.prompt_cache is not None:
            self.prompt_cache.ids = list(self.prompts[0])
        return logits[:, -1]


def left_pad(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids and mask (1 = real token), shorter prompts padded on the left."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def as_prompt_lists(input_ids: Any) -> tuple[list[list[int]], bool]:
    """Normalise ids, list of ids, list of lists or a tensor; also say if the input was a tensor."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise MiniCPMError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        return input_ids.tolist(), True
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise MiniCPMError("input_ids must be a non-empty list of token ids or a tensor")
    if all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)], False
    if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in input_ids):
        return [list(p) for p in input_ids], False
    raise MiniCPMError("input_ids must be a list of ints, a list of lists of ints, or a tensor")


def generate(model, input_ids: Any, max_new_tokens: int | None = 128, pad_token_id: int | None = None,
             **sampling: Any):
    """Generate for one prompt or a batch; returns the new tokens (stop token included).

    Tensor input gives a [B, new] tensor padded with the pad id; list input gives lists.
    """
    prompts, was_tensor = as_prompt_lists(input_ids)
    params = SamplingParams.from_kwargs(max_new_tokens=max_new_tokens, **sampling)
    gen = TokenGenerator(model, prompts, params, pad_token_id=pad_token_id)
    rows: list[list[int]] = [[] for _ in prompts]
    for step in gen:
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    if was_tensor:
        width = max(map(len, rows), default=0)
        out = torch.full((len(rows), width), gen.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out
    return rows[0] if len(rows) == 1 and all(isinstance(t, int) for t in input_ids) else rows
