"""Embedding lookups from a quantized head's table, for models that tie the two.

MiniCPM-2B's tied 122753 x 2304 table is 566 MB in bf16; its int8 head copy is 283 MB. Reading
the lookup rows from the head's int8 codes (each row dequantized with its own scale) drops the
float table from memory and from the checkpoint, at the cost of int8 rounding in the input
embedding (see tests/test_quantize_stream.py for the measured logit difference).
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm.quantization.linear import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """`embed_tokens` that gathers rows of a QuantizedLinear head (`head.rows(ids)`)."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        # Held outside the module tree: the head is already `model.lm_head`, and registering it
        # twice would store its tensors twice and make .to()/state_dict see a second copy.
        self.__dict__["_head"] = head

    @property
    def head(self) -> QuantizedLinear:
        return self._head

    @property
    def num_embeddings(self) -> int:
        return self._head.out_features

    @property
    def embedding_dim(self) -> int:
        return self._head.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._head.rows(input_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table=lm_head (int{self._head.bits})"
