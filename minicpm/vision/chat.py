"""`MiniCPMV.chat()`, as the official API has it: (answer, context, generation_config).

Official behaviour kept: the prompt layout (minicpm.vision.prompt), the image placeholder in the
first message only, `context` ignored as input and returned as msgs + the answer, the defaults
(sampling: top_p 0.8, top_k 100, temperature 0.7, repetition_penalty 1.05; sampling=False: beam
search with 3 beams and repetition_penalty 1.2; max_new_tokens 1024), a repetition penalty that
sees only generated tokens, generation ending at the end-of-sequence token, the answer decoded
without ids 0, BOS and the final EOS and stripped.

Deliberate differences: our other sampling options (min_p, seed, ...) are accepted instead of
dropped silently, and unknown ones are an error; a prompt longer than max_inp_length is an
error instead of being cut (a cut prompt loses its image bounds or the final `<AI>`).

A conversation's image features and KV cache are kept on the model (`model.conversation`):
a follow-up turn about the same image neither re-encodes it nor runs the shared prefix again.
`stream_chat()` is the same turn with the reply streamed as text (what `minicpm chat` shows).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minicpm.errors import MiniCPMError
from minicpm.generation.generate import PREFILL_CHUNK, PromptCache, TokenGenerator
from minicpm.generation.sampling import SamplingParams
from minicpm.generation.text import GenerationStats, stream_text
from minicpm.vision.beam import beam_search
from minicpm.vision.image import load_image, sliced_images, to_pixel_values
from minicpm.vision.prompt import IM_END, IM_START, chat_prompt, image_bounds, image_placeholder

SAMPLING_DEFAULTS = {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "repetition_penalty": 1.05}
BEAM_DEFAULTS = {"num_beams": 3, "repetition_penalty": 1.2}
# Options that only shape sampling: beam search ignores them, as the official chat() does.
SAMPLING_ONLY = {"top_p", "top_k", "temperature", "min_p", "seed", "do_sample"}


@dataclass
class Conversation:
    """What a chat keeps between turns: which image (a digest of its pixels), its features,
    and the KV cache of the last prompt and answer."""

    image_key: str | None
    features: torch.Tensor | None = None
    prompt_cache: PromptCache = field(default_factory=PromptCache)


def chat(model, image: Any, msgs: Any, context: Any = None, tokenizer=None,
         vision_hidden_states: torch.Tensor | None = None, max_new_tokens: int = 1024,
         sampling: bool = True, max_inp_length: int = 2048, **generation: Any):
    turn = prepare_turn(model, image, msgs, tokenizer, max_new_tokens, vision_hidden_states, max_inp_length)
    if sampling:
        config = {**SAMPLING_DEFAULTS, **generation}
        new = _sample(model, turn, config)
    else:
        config = {**BEAM_DEFAULTS, **{k: v for k, v in generation.items() if k not in SAMPLING_ONLY}}
        new = _beams(model, turn, config)
    answer = decode_answer(tokenizer, new)
    context = list(msgs) + [{"role": "assistant", "content": answer}]
    return answer, context, config


def stream_chat(model, tokenizer, image: Any, msgs: list[dict[str, str]], stats: GenerationStats | None = None,
                progress: Callable[[int, int], None] | None = None, max_new_tokens: int | None = None,
                max_inp_length: int = 2048, **sampling: Any) -> Iterator[str]:
    """The reply to `msgs` about `image` (or None), piece by piece, sampled with the official
    defaults for what `sampling` leaves out (temperature 0: greedy). The conversation's
    features and cache are kept as chat() keeps them; `progress(done, total)` follows the
    image's encoding slice by slice. `stats` counts the prompt and times it from the start."""
    started = time.perf_counter()
    turn = prepare_turn(model, image, msgs, tokenizer, max_new_tokens or 1024, None, max_inp_length, progress)
    params = SamplingParams.from_kwargs(**{**SAMPLING_DEFAULTS, "max_new_tokens": turn.max_new_tokens,
                                           "stop_token_ids": [turn.eos],
                                           **{k: v for k, v in sampling.items() if v is not None}})
    stats = stats if stats is not None else GenerationStats()
    prepared = time.perf_counter() - started
    yield from stream_text(model.llm, tokenizer, turn.ids, params, stats, turn.cache, penalize_prompt=False)
    stats.prefill_seconds += prepared  # the image and the prompt prefix ran before stream_text
    stats.cached_prompt_tokens = turn.reused


@dataclass
class Turn:
    """A chat turn ready to generate: its prompt ids, all but the last already in the cache."""

    ids: list[int]
    cache: PromptCache
    eos: int
    max_new_tokens: int  # what was asked, within what the context leaves
    reused: int  # prompt tokens an earlier turn had put in the cache


def prepare_turn(model, image: Any, msgs: Any, tokenizer, max_new_tokens: int,
                 vision_hidden_states: torch.Tensor | None = None, max_inp_length: int = 2048,
                 progress: Callable[[int, int], None] | None = None) -> Turn:
    """Lay out and tokenize the prompt, encode the image (unless the conversation has it) and
    prefill all of the prompt but its last token."""
    if tokenizer is None:
        raise MiniCPMError("chat needs the tokenizer (tokenizer=...)")
    if isinstance(msgs, str):
        msgs = json.loads(msgs)
    image = None if image is None else load_image(image)
    placeholder = None if image is None else image_placeholder(image.size, model.config)
    ids = tokenizer.encode(chat_prompt(msgs, placeholder))
    if len(ids) > max_inp_length:
        raise MiniCPMError(f"the prompt has {len(ids)} tokens, more than max_inp_length={max_inp_length}")
    room = model.config.llm.max_position_embeddings - len(ids)
    if room < 1:
        raise MiniCPMError(f"the prompt has {len(ids)} tokens; the model's context holds "
                           f"{model.config.llm.max_position_embeddings}")
    conversation = _conversation(model, image, vision_hidden_states, progress)
    bounds = _bounds(tokenizer, ids, image, conversation.features, model.config.query_num)
    max_new_tokens = min(max_new_tokens, room)
    reused = _prefill(model, conversation.prompt_cache, ids, conversation.features, bounds,
                      len(ids) + max_new_tokens)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.llm.eos_token_ids[0]
    return Turn(ids, conversation.prompt_cache, eos, max_new_tokens, reused)


def _conversation(model, image, vision_hidden_states: torch.Tensor | None,
                  progress: Callable[[int, int], None] | None = None) -> Conversation:
    """The kept conversation if it is about the same image, else a new one (encoding it)."""
    key = None if image is None else image_digest(image)
    kept = model.conversation
    if kept is None or kept.image_key != key:
        kept = model.conversation = Conversation(key)
    if vision_hidden_states is not None:
        kept.features = vision_hidden_states
    elif image is not None and kept.features is None:
        slices, _ = sliced_images(image, model.config)
        with torch.inference_mode():
            kept.features = model.get_vision_embedding([to_pixel_values(s) for s in slices], progress)
    return kept


def image_digest(image) -> str:
    """Identifies an image by its pixels (a reloaded file is the same image)."""
    pixels = np.asarray(image, dtype=np.uint8)
    return hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def _bounds(tokenizer, ids: list[int], image, features: torch.Tensor | None, query_num: int) -> torch.Tensor:
    if image is None:
        return torch.zeros(0, 2, dtype=torch.long)
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise MiniCPMError("the tokenizer has no <image>/</image> tokens: it is not MiniCPM-V's")
    bounds = image_bounds(torch.tensor(ids), start, end)
    spans = (bounds[:, 1] - bounds[:, 0]).tolist()
    if len(bounds) != len(features) or any(n != query_num for n in spans):
        raise MiniCPMError(f"the prompt holds {len(bounds)} image spans for {len(features)} image "
                           "slices (is there an <image> tag in the message text?)")
    return bounds


@torch.inference_mode()
def _prefill(model, prompt_cache: PromptCache, ids: list[int], features, bounds, capacity: int) -> int:
    """Put all prompt positions but the last into the conversation's cache, from embeddings
    (the image features merged in); positions an earlier turn left there are not run again.
    Returns how many that were."""
    cache, done = prompt_cache.reuse(model.llm, ids, capacity)
    if done < len(ids) - 1:
        embeds = model.embed(torch.tensor([ids], device=model.device), [features], [bounds])
        for start in range(done, len(ids) - 1, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, len(ids) - 1)
            model.llm(inputs_embeds=embeds[:, start:end], cache=cache, last_only=True)
    prompt_cache.ids = list(ids[:-1])
    return done


def _sample(model, turn: Turn, config: dict[str, Any]) -> list[int]:
    params = SamplingParams.from_kwargs(**{"max_new_tokens": turn.max_new_tokens, "do_sample": True,
                                           "stop_token_ids": [turn.eos], **config})
    # the last prompt token is a text token: the generator runs it by id after the cached prefix
    generator = TokenGenerator(model.llm, [turn.ids], params, prompt_cache=turn.cache, penalize_prompt=False)
    return [step[0] for step in generator if step[0] is not None]


def _beams(model, turn: Turn, config: dict[str, Any]) -> list[int]:
    known = {"num_beams", "repetition_penalty", "length_penalty"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise MiniCPMError(f"unknown beam search argument(s): {', '.join(unknown)}; "
                           f"supported: {', '.join(sorted(known))}")
    num_beams = config["num_beams"]
    if not isinstance(num_beams, int) or num_beams < 1:
        raise MiniCPMError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if config["repetition_penalty"] <= 0:
        raise MiniCPMError(f"repetition_penalty must be > 0, got {config['repetition_penalty']}")
    return beam_search(model.llm, turn.cache.cache, turn.ids[-1], num_beams, turn.max_new_tokens, {turn.eos},
                       repetition_penalty=config["repetition_penalty"],
                       length_penalty=config.get("length_penalty", 1.0))


def decode_answer(tokenizer, new: list[int]) -> str:
    """The official decoding: ids 0 dropped, a leading BOS and a final EOS cut, text stripped."""
    new = [t for t in new if t != 0]
    if new and new[0] == tokenizer.bos_token_id:
        new = new[1:]
    if new and new[-1] == tokenizer.eos_token_id:
        new = new[:-1]
    return tokenizer.decode(new).strip()
