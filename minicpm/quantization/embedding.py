"""Embedding lookups from a quantized table: a tied head's, or a table of its own.

MiniCPM-2B's tied 122753 x 2304 table is 566 MB in bf16; its int8 head copy is 283 MB. Reading
the lookup rows from the head's int8 codes (each row dequantized with its own scale) drops the
float table from memory and from the checkpoint, at the cost of int8 rounding in the input
embedding (see tests/test_quantize_stream.py for the measured logit difference).
An untied GGUF token_embd stored quantized is such a table of its own (`owned=True`): a
QuantizedLinear never used as one, read a few rows per token.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm.quantization.linear import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """`embed_tokens` that gathers rows of a QuantizedLinear head (`head.rows(ids)`)."""

    def __init__(self, head: QuantizedLinear, owned: bool = False):
        super().__init__()
        self.owned = owned
        if owned:  # its own table: saved and moved with this module ("embed_tokens.qweight", ...)
            self.table = head
        # A shared head is held outside the module tree: it is already `model.lm_head`, and
        # registering it twice would store its tensors twice and make .to()/state_dict see a copy.
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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.owned:  # the table's tensors under this module's name, as a Linear's would be
            for name, tensor in self.table.portable_state().items():
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if destination is None:
            from collections import OrderedDict
            destination = OrderedDict()
        self._save_to_state_dict(destination, prefix, keep_vars)  # not the table's own entries
        return destination

    def extra_repr(self) -> str:
        table = "own" if self.owned else "lm_head"
        return f"{self.num_embeddings}, {self.embedding_dim}, table={table} (int{self._head.bits})"
