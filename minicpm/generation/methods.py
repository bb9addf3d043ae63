"""`generate()` and `chat()` as methods of the model, as the official MiniCPM API has them.

The decoder (`minicpm.model`) is core and knows nothing of sampling or chat templates; importing
this module gives the two methods to it, once. `minicpm.load` does, so every model it returns
has them; code that builds a model by hand imports this module (or calls
`minicpm.generation.generate` / `minicpm.generation.chat` directly).
"""

from __future__ import annotations

from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.generation.chat import chat
from minicpm.generation.generate import generate
from minicpm.model import MiniCPMForCausalLM


class GenerationMethods:
    """`model.generate(...)` and `model.chat(...)`, as the official MiniCPM code has them."""

    def generate(self, input_ids, max_new_tokens: int = 128, **sampling: Any):
        """New token ids for each prompt; temperature 0 (the default) is greedy.

        `input_ids`: a list of ids, a list of such lists (batched, left-padded internally) or a
        [B, S] tensor. Returns a [B, new] tensor (rows that stopped early padded with the pad
        id) for tensor input, otherwise lists. See `minicpm.generation.generate`.
        """
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **sampling)

    def chat(self, tokenizer=None, query: str | None = None, history: list[dict] | None = None,
             role: str = "user", **sampling: Any) -> tuple[str, list[dict]]:
        """The official `chat()`: returns (response, history) with the reply appended."""
        if sampling.get("image") is not None or "msgs" in sampling:
            # MiniCPM-V's chat(image=..., msgs=...) called on a text model
            raise MiniCPMError("this is a text-only model: it cannot read images "
                               "(load a MiniCPM-V checkpoint for chat(image=..., msgs=...))")
        if query is None:
            raise MiniCPMError("chat needs a query: model.chat(tokenizer, query, history)")
        return chat(self, tokenizer, query, history=history, role=role, **sampling)


for _name in ("generate", "chat"):
    setattr(MiniCPMForCausalLM, _name, getattr(GenerationMethods, _name))
