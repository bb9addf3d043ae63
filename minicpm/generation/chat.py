"""`chat()`, as the official MiniCPM API has it, on top of the shared generator.

Official behaviour kept: history is a list of {"role", "content"} dicts, extended in place with
the query and the reply; sampling defaults are do_sample=True, top_p=0.8, temperature=0.3,
max_length=4096 (prompt + reply); the reply is cut at the first "<AI>" or "<用户>" marker.
Deliberate difference: the markers act as stop strings, so generation ends as soon as one
appears instead of running on to the end-of-sequence token and cutting afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from minicpm.errors import MiniCPMError
from minicpm.generation.params import SamplingParams
from minicpm.generation.text import GenerationStats, stream_text

if TYPE_CHECKING:
    from minicpm.generation.generate import PromptCache

OFFICIAL_DEFAULTS = {"temperature": 0.3, "top_p": 0.8}
ROLE_MARKERS = ["<AI>", "<用户>"]
TEXT_ONLY = "this is a text-only model: it cannot read images (--image and /image need a MiniCPM-V checkpoint)"


def chat_params(prompt_len: int, context: int, max_length: int = 4096, **sampling: Any) -> SamplingParams:
    """Sampling settings for a chat turn: official defaults, HF-style names accepted."""
    sampling = {**OFFICIAL_DEFAULTS, **sampling}
    if sampling.get("max_new_tokens") is None:
        sampling["max_new_tokens"] = max(1, min(max_length, context) - prompt_len)
    stops = sampling.pop("stop", None) or []
    sampling["stop"] = ([stops] if isinstance(stops, str) else list(stops)) + ROLE_MARKERS
    return SamplingParams.from_kwargs(**sampling)


def stream_chat(model, tokenizer, messages: list[dict], stats: GenerationStats | None = None,
                prompt_cache: PromptCache | None = None, **sampling: Any) -> Iterator[str]:
    """Stream the assistant's reply to `messages` (rendered with the model's chat template).

    Pass the same `prompt_cache` for every turn of a conversation to skip re-running the
    history that the previous turn already put in the KV cache.
    """
    if tokenizer is None:
        raise MiniCPMError("this checkpoint has no tokenizer files; chat needs one")
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    params = chat_params(len(prompt_ids), model.config.max_position_embeddings, **sampling)
    yield from stream_text(model, tokenizer, prompt_ids, params, stats, prompt_cache)


def chat(model, tokenizer, query: str, history: list[dict] | None = None, role: str = "user",
         **sampling: Any) -> tuple[str, list[dict]]:
    if not isinstance(query, str):
        raise MiniCPMError(f"query must be a string, got {type(query).__name__}")
    history = [] if history is None else history
    history.append({"role": role, "content": query})
    response = "".join(stream_chat(model, tokenizer, history, **sampling))
    history.append({"role": "assistant", "content": response})
    return response, history
