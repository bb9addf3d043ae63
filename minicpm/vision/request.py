"""A chat prompt with images, encoded a batch of slices at a time: what the server's scheduler
(minicpm.serving.engine) prefills for a request with images.

`image_prompt` lays out OpenAI-style messages whose images may sit in any user message (each
image's placeholder and a newline open its message, as the official chat() opens the first
message with its one image), tokenizes them and slices the images. The `ImagePrompt` then runs
the vision tower one batch of same-size slices per `encode_step`, so that other requests keep
decoding between batches, and finally gives the prompt's input embeddings with the features
merged in (`MiniCPMV.embed`). The choices of one request share one ImagePrompt: its images are
encoded once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from minicpm.errors import MiniCPMError
from minicpm.vision.image import load_image, sliced_images, to_pixel_values
from minicpm.vision.prompt import (
    IM_END,
    IM_START,
    image_bounds,
    image_placeholder,
    images_chat_prompt,
)


class ImagePrompt:
    def __init__(self, ids: list[int], bounds: torch.Tensor, slices: list[Any], images: int):
        self.ids, self.bounds, self.images = ids, bounds, images
        self.slice_count = len(slices)
        self._slices: list[Any] | None = slices  # PIL slices until encoding starts (uint8: small)
        self._steps: Iterator[tuple[list[int], torch.Tensor]] | None = None
        self._features: list[torch.Tensor | None] = [None] * len(slices)
        self._embeds: torch.Tensor | None = None

    @property
    def encoded(self) -> bool:
        return all(f is not None for f in self._features)

    def encode_step(self, model) -> int:
        """Run the vision tower on the next batch of slices; returns how many it encoded."""
        if self._steps is None:
            pixels = [to_pixel_values(s) for s in self._slices]
            self._slices = None
            self._steps = model.vision_embedding_steps(pixels)
        indices, features = next(self._steps)
        for i, row in zip(indices, features):
            self._features[i] = row
        return len(indices)

    def embeddings(self, model) -> torch.Tensor:
        """The prompt's input embeddings [S, hidden] (once every slice is encoded)."""
        if self._embeds is None:
            if not self.encoded:
                raise MiniCPMError("the images of this prompt are not encoded yet")
            features = torch.stack(self._features) if self._features else None
            ids = torch.tensor([self.ids], device=model.device)
            self._embeds = model.embed(ids, [features], [self.bounds])[0]
            self._features = []  # the embeddings hold them now
        return self._embeds


def image_prompt(msgs: list[dict[str, str]], images: dict[int, list[Any]], tokenizer, config,
                 generation_prompt: bool = True) -> ImagePrompt:
    """The prompt of chat messages (string contents) whose message i shows `images[i]`
    (PIL images, paths or bytes), for a MiniCPMVConfig; it ends with `<AI>` unless
    `generation_prompt` is False."""
    opened = {i: [load_image(image) for image in found] for i, found in images.items() if found}
    placeholders = {i: [image_placeholder(image.size, config) for image in found] for i, found in opened.items()}
    ids = tokenizer.encode(images_chat_prompt(msgs, placeholders, generation_prompt))
    slices = [s for i in sorted(opened) for image in opened[i] for s in sliced_images(image, config)[0]]
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise MiniCPMError("the tokenizer has no <image>/</image> tokens: it is not MiniCPM-V's")
    bounds = image_bounds(torch.tensor(ids), start, end)
    if len(bounds) != len(slices) or any(e - s != config.query_num for s, e in bounds.tolist()):
        raise MiniCPMError(f"the prompt holds {len(bounds)} image spans for {len(slices)} image slices "
                           "(is there an <image> tag in the message text?)")
    return ImagePrompt(ids, bounds, slices, sum(len(found) for found in opened.values()))
