"""What each recipe trains on and what it minimises: pretraining windows, SFT chats, DPO pairs.

A task numbers its samples 0..N-1 and turns a list of sample numbers into a batch (`collate`)
and a batch into (loss summed over the batch, metrics) (`loss`). The trainer decides which
samples each step and each process sees (`sample_order`), so the data position of a run is one
number (samples seen) and resuming needs no loader state.

Losses are sums, normalised by the trainer with the count over the whole global batch
(`count`): the gradient is then the same whatever the micro-batch size, the accumulation or the
number of processes, and a 2-process run matches a 1-process one. The next-token losses are
taken from the final hidden states a slice at a time (chunked_loss.py): the logits of a whole
batch are never built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minicpm.training.chunked_loss import row_nll, summed_nll
from minicpm.training.data import IGNORE_INDEX, Example


def sample_order(num_samples: int, seed: int, position: int, count: int) -> list[int]:
    """Sample numbers at global positions [position, position + count): each epoch is a fresh
    permutation drawn from (seed, epoch), so any position is found without replaying the run."""
    out: list[int] = []
    for pos in range(position, position + count):
        epoch, index = divmod(pos, num_samples)
        out.append(int(_epoch_order(num_samples, seed, epoch)[index]))
    return out


@functools.lru_cache(maxsize=2)  # a step reads at most two epochs; drawing one costs O(N)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class PretrainTask:
    """Windows of seq_len + 1 tokens cut from packed shards at a stride of seq_len (the last
    token of a window is the first of the next); every token is a target."""

    def __init__(self, tokens, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_samples = (tokens.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            from minicpm.errors import MiniCPMError

            raise MiniCPMError(f"the data holds {tokens.num_tokens} tokens, fewer than one window of "
                               f"data.seq_len + 1 = {seq_len + 1}")

    def collate(self, samples: list[int]) -> dict[str, torch.Tensor]:
        rows = [torch.from_numpy(self.tokens.read(i * self.seq_len, self.seq_len + 1)) for i in samples]
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids}

    def count(self, samples: list[int]) -> int:
        return len(samples) * self.seq_len

    def width(self) -> int:
        """The longest row of a batch."""
        return self.seq_len + 1

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return summed_nll(model, model(batch["input_ids"], hidden=True), batch["labels"]), {}


class SftTask:
    """Chat examples, right-padded per micro-batch; only assistant tokens are targets."""

    def __init__(self, examples: list[Example], pad_id: int):
        self.examples, self.pad_id = examples, pad_id
        self.num_samples = len(examples)

    def collate(self, samples: list[int]) -> dict[str, torch.Tensor]:
        return pad_examples([self.examples[i] for i in samples], self.pad_id)

    def count(self, samples: list[int]) -> int:
        return sum(_targets(self.examples[i]) for i in samples)

    def width(self) -> int:
        """The longest row of a batch."""
        return max(len(e.input_ids) for e in self.examples)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids"), hidden=True, skip_padding=True)
        return summed_nll(model, hidden, batch["labels"]), {}


class PackedSftTask(SftTask):
    """Chat examples packed into rows of up to `width` tokens (data.pack): a sample is a row
    of several examples, each with its own positions (from 0) and attending only to itself,
    so its loss is the sum of the examples' own losses, without the padding."""

    def __init__(self, examples: list[Example], pad_id: int, width: int):
        super().__init__(examples, pad_id)
        self.rows = pack_examples(examples, width)
        self.num_samples = len(self.rows)

    def collate(self, samples: list[int]) -> dict[str, torch.Tensor]:
        return packed_rows([[self.examples[i] for i in self.rows[s]] for s in samples], self.pad_id)

    def count(self, samples: list[int]) -> int:
        return sum(_targets(self.examples[i]) for s in samples for i in self.rows[s])

    def width(self) -> int:
        return max(sum(len(self.examples[i].input_ids) for i in row) for row in self.rows)


def pack_examples(examples: list[Example], width: int) -> list[list[int]]:
    """Example numbers grouped into rows of at most `width` tokens: longest first, each into
    the first row with room (deterministic: ties keep the data's order)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        row = next((r for r, free in enumerate(room) if n <= free), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


def packed_rows(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / labels / position_ids [B, longest] and a block-diagonal causal attention
    mask [B, 1, longest, longest]: a token sees the earlier tokens of its own example only."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)  # 0: padding
    for r, row in enumerate(rows):
        start = 0
        for number, e in enumerate(row, 1):
            n = len(e.input_ids)
            ids[r, start:start + n] = torch.tensor(e.input_ids)
            labels[r, start + 1:start + n] = torch.tensor(e.labels[1:])  # nothing predicts across examples
            positions[r, start:start + n] = torch.arange(n)
            segment[r, start:start + n] = number
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    mask = (same & causal & (segment[:, None, :] > 0)) | torch.eye(width, dtype=torch.bool)  # a pad sees itself
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}


ROW_MULTIPLE = 64  # real positions per micro-batch are rounded up to this (round_real_positions)


def _targets(example: Example) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def pad_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / labels / attention_mask [B, longest], padded on the right, with the count of
    positions the layers compute rounded up (`round_real_positions`)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    lengths = [len(e.input_ids) for e in examples]
    for row, e in enumerate(examples):
        ids[row, :lengths[row]] = torch.tensor(e.input_ids)
        labels[row, :lengths[row]] = torch.tensor(e.labels)
    lengths = round_real_positions(lengths, width, ROW_MULTIPLE)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def round_real_positions(lengths: list[int], width: int, multiple: int) -> list[int]:
    """Row lengths whose total is a multiple of `multiple` (or every position of the batch): the
    shortest rows are extended into their padding. The layers run on the batch's real positions
    only (`skip_padding`), so their products have as many rows as the lengths add up to, and
    oneDNN keeps a primitive, with its buffers, for every row count it meets: with a different
    count at every micro-batch, LoRA's peak RSS grew by ~600 MB over 20 steps (12 steps of the
    default model's chosen micro-batch: 2,710 MB, rounded to 64: 2,387 MB). The added
    positions come after each row's own tokens and carry no label, so no real token sees them
    and the loss and gradients are those of the real tokens."""
    total = sum(lengths)
    extra = min(-total % multiple, len(lengths) * width - total)
    lengths = list(lengths)
    while extra:
        row = min(range(len(lengths)), key=lambda r: lengths[r])
        step = min(extra, width - lengths[row])
        lengths[row] += step
        extra -= step
    return lengths


@dataclass
class PairLogps:
    chosen: torch.Tensor  # [B] summed log-probabilities of the chosen replies
    rejected: torch.Tensor


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's target tokens, [B]."""
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], hidden=True, skip_padding=True)
    return -row_nll(model, hidden, batch["labels"])


def dpo_loss(policy: PairLogps, reference: PairLogps, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair,
    with the implicit rewards beta * (pi - ref) of both replies."""
    chosen_reward = beta * (policy.chosen - reference.chosen)
    rejected_reward = beta * (policy.rejected - reference.rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    return losses, {"chosen_reward": chosen_reward.detach(), "rejected_reward": rejected_reward.detach()}


class DpoTask:
    """Preference pairs: chosen and rejected replies to the same prompt run as one batch.

    The reference log-probabilities come from `reference(batch) -> [2B]` (a frozen model, or the
    policy with its adapters off) or, precomputed once before training, from `precomputed`
    ([N, 2] by pair number)."""

    def __init__(self, pairs, pad_id: int, beta: float, reference=None, precomputed: torch.Tensor | None = None):
        self.pairs, self.pad_id, self.beta = pairs, pad_id, beta
        self.reference, self.precomputed = reference, precomputed
        self.num_samples = len(pairs)

    def collate(self, samples: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.pairs[i].chosen for i in samples] + [self.pairs[i].rejected for i in samples]
        batch = pad_examples(examples, self.pad_id)
        batch["pairs"] = torch.tensor(samples)
        return batch

    def count(self, samples: list[int]) -> int:
        return len(samples)

    def width(self) -> int:
        """The longest row of a batch."""
        return max(len(e.input_ids) for p in self.pairs for e in (p.chosen, p.rejected))

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.precomputed is not None:
            ref = self.precomputed[batch["pairs"]]
            return torch.cat([ref[:, 0], ref[:, 1]])
        with torch.no_grad():
            return self.reference(batch)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(batch["pairs"])
        logps = sequence_logps(model, batch)
        ref = self.reference_logps(batch).to(logps.dtype)
        losses, rewards = dpo_loss(PairLogps(logps[:n], logps[n:]), PairLogps(ref[:n], ref[n:]), self.beta)
        margin = rewards["chosen_reward"] - rewards["rejected_reward"]
        # sums over the pairs: the trainer divides by the global pair count, as it does the loss
        return losses.sum(), {"reward_margin": float(margin.sum()), "reward_accuracy": float((margin > 0).sum()),
                              "chosen_reward": float(rewards["chosen_reward"].sum()),
                              "rejected_reward": float(rewards["rejected_reward"].sum())}
