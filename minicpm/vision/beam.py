"""Beam search, as Hugging Face transformers (4.40) runs it for MiniCPM-V's `sampling=False`.

Each step: log-softmax of every beam's logits, then the repetition penalty applied to those
log-probabilities (a beam's own generated tokens only), plus the beam's running score; the best
2 x num_beams (token, beam) pairs in order; an end-of-sequence pair among the first num_beams
closes a hypothesis scored sum / length^length_penalty, the other pairs fill the next beams.
The search stops when num_beams hypotheses are closed and none of the open beams could beat the
worst of them (early_stopping=False), or at max_new_tokens, when the open beams are closed too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minicpm.cache import KVCache
from minicpm.generation.sampling import apply_repetition_penalty


@dataclass
class Hypotheses:
    """The best `num_beams` finished sequences (HF's BeamHypotheses)."""

    num_beams: int
    length_penalty: float = 1.0
    beams: list[tuple[float, list[int]]] = field(default_factory=list)  # score, ids (EOS included)
    worst_score: float = 1e9

    def add(self, ids: list[int], sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / length ** self.length_penalty
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted(self.beams, key=lambda b: b[0])
                self.beams.remove(ranked[0])
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """No open beam can still beat the worst kept one (HF's early_stopping=False)."""
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty

    def best(self) -> list[int]:
        return max(self.beams, key=lambda b: b[0])[1]


@torch.inference_mode()
def beam_search(llm, prefix: KVCache, last_token: int, num_beams: int, max_new_tokens: int,
                eos_ids: set[int], repetition_penalty: float = 1.0,
                length_penalty: float = 1.0) -> list[int]:
    """The best continuation (its EOS included, if it ended with one) of a prompt whose tokens
    but the last are in `prefix` (a one-row cache); `last_token` is the prompt's last id."""
    start = prefix.length
    cache = llm.new_cache(num_beams, start + 1 + max_new_tokens)
    cache.copy_prefix(prefix, start)  # one row broadcast to every beam
    cache.length = start
    tokens = torch.full((num_beams,), last_token, dtype=torch.long, device=llm.device)
    scores = torch.full((num_beams,), -1e9)
    scores[0] = 0.0  # the beams start equal: only the first may expand at step 1
    history: list[list[int]] = [[] for _ in range(num_beams)]
    seen = None
    hypotheses = Hypotheses(num_beams, length_penalty)
    done = False
    for step in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(llm(tokens[:, None], cache=cache)[:, -1].float().cpu(), dim=-1)
        if seen is None:
            seen = torch.zeros_like(logprobs, dtype=torch.bool)
        if repetition_penalty != 1.0:
            logprobs = apply_repetition_penalty(logprobs, seen, repetition_penalty)
        vocab = logprobs.shape[-1]
        top, index = (logprobs + scores[:, None]).view(-1).topk(2 * num_beams)
        chosen: list[tuple[float, int, int]] = []  # score, beam, token
        for rank, (score, flat) in enumerate(zip(top.tolist(), index.tolist())):
            beam, token = divmod(flat, vocab)
            if token in eos_ids:
                if rank < num_beams:
                    hypotheses.add(history[beam] + [token], score, step)
            else:
                chosen.append((score, beam, token))
            if len(chosen) == num_beams:
                break
        rows = torch.tensor([beam for _, beam, _ in chosen])
        tokens = torch.tensor([token for _, _, token in chosen], device=llm.device)
        scores = torch.tensor([score for score, _, _ in chosen])
        history = [history[beam] + [token] for _, beam, token in chosen]
        seen = seen[rows]
        seen[torch.arange(num_beams), tokens.cpu()] = True
        cache.reorder_rows(rows, start + 1)
        done = hypotheses.is_done(float(top.max()), step)
        if done:
            break
    if not done:
        for score, ids in zip(scores.tolist(), history):
            hypotheses.add(ids, score, len(ids))
    return hypotheses.best()
