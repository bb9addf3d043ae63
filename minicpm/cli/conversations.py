"""The conversations `minicpm chat` runs on a PyTorch model: a text model's is its chat
template's history (`TextChat`); a MiniCPM-V model's is its own layout with at most one image,
placed in the first message as its chat() does (`ImageChat`). Both keep the conversation in the
KV cache between turns. (The torch-free runtime's is `minicpm.lean.chat.LeanChat`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.generation.chat import TEXT_ONLY, stream_chat
from minicpm.generation.generate import PromptCache
from minicpm.generation.prompts import common_prefix
from minicpm.generation.text import GenerationStats
from minicpm.vision import MiniCPMV, load_image
from minicpm.vision.chat import stream_chat as stream_image_chat
from minicpm.vision.image import slice_count

class TextChat:
    """A text model's conversation: the chat template's history."""

    image = None  # a text model reads none

    def __init__(self, model, tokenizer, system: str | None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.prompt_cache = PromptCache()
        self.keep_cache = False  # across /reset: a loaded or primed document stays useful
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        if not self.keep_cache:
            self.prompt_cache = PromptCache()

    def use_prompt_cache(self, prompt_cache: PromptCache) -> None:
        """Continue from a saved cache (only the prefix it shares with each prompt is reused)."""
        self.prompt_cache, self.keep_cache = prompt_cache, True

    def prime(self) -> int:
        """Prefill the system message now (the document a conversation is about), so that the
        first question runs only itself; returns the tokens run. The ids every prompt of this
        conversation starts with: the common prefix of two prompts with different questions."""
        def prompt(question: str) -> list[int]:
            return self.tokenizer.apply_chat_template(self.history + [{"role": "user", "content": question}],
                                                      add_generation_prompt=True, tokenize=True)
        first = prompt("a")
        common = common_prefix(first, prompt("b"))
        self.keep_cache = True
        return self.prompt_cache.prefill(self.model, first[:common]) if common else 0

    def set_image(self, path: str | None) -> str:
        raise MiniCPMError(TEXT_ONLY)

    def reply(self, query: str, sampling: dict, stats: GenerationStats) -> Iterator[str]:
        messages = self.history + [{"role": "user", "content": query}]
        return stream_chat(self.model, self.tokenizer, messages, stats=stats, prompt_cache=self.prompt_cache,
                           **sampling)

    def record(self, query: str, reply: str) -> None:
        self.history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]


class ImageChat:
    """A MiniCPM-V conversation: the messages and the image (its features and the KV cache are
    kept on the model between turns)."""

    def __init__(self, model, tokenizer, progress: Callable[[int, int], None] | None = None):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.image = None
        self.reset()

    def reset(self) -> None:
        self.msgs: list[dict[str, str]] = []

    def set_image(self, path: str | None) -> str:
        """Talk about the image at `path` (None: no image) in a new conversation; says what it is."""
        if path is None:
            self.image = None
            self.reset()
            return "no image; new conversation"
        image = load_image(path)  # before anything changes: a bad file leaves the conversation as it was
        slices = slice_count(image.size, self.model.config)
        self.image = image
        self.reset()
        return (f"image {Path(path).name}, {image.width}x{image.height}, read as {slices} "
                f"slice{'s' if slices > 1 else ''}; new conversation")

    def reply(self, query: str, sampling: dict, stats: GenerationStats) -> Iterator[str]:
        msgs = self.msgs + [{"role": "user", "content": query}]
        return stream_image_chat(self.model, self.tokenizer, self.image, msgs, stats=stats, progress=self.progress,
                                 **sampling)

    def record(self, query: str, reply: str) -> None:
        self.msgs += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]


def conversation(model, tokenizer, system: str | None = None, image: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> TextChat | ImageChat:
    """The conversation object for this model; checks --system and --image against it."""
    if not isinstance(model, MiniCPMV):
        if image is not None:
            raise MiniCPMError(TEXT_ONLY)
        return TextChat(model, tokenizer, system)
    if system:
        raise MiniCPMError("MiniCPM-V 2.0 has no system message: say it in your first message instead")
    chat = ImageChat(model, tokenizer, progress)
    if image is not None:
        chat.set_image(image)
    return chat
