"""MiniCPM-V 2.0's prompt text: image placeholders, the chat layout, and image bounds.

One image (or slice) is `<image>` + query_num x `<unk>` + `</image>`; the `<unk>` positions are
where its resampled features replace the token embeddings. A sliced image is the overview's
placeholder, then `<slice>`, the tiles' placeholders with rows joined by newlines, `</slice>`.
The chat layout is `<用户>` / `<AI>` + content per message with nothing between turns, then a
final `<AI>`; the image placeholder and a newline open the first (user) message.
"""

from __future__ import annotations

from typing import Any

import torch

from minicpm.errors import MiniCPMError
from minicpm.vision.image import best_grid

IM_START, IM_END, UNK = "<image>", "</image>", "<unk>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
USER, ASSISTANT = "<用户>", "<AI>"


def one_image_placeholder(query_num: int) -> str:
    return IM_START + UNK * query_num + IM_END


def grid_placeholder(grid: list[int], query_num: int) -> str:
    """`<slice>` + rows of `cols` placeholders joined by newlines + `</slice>`."""
    cols, rows = grid
    row = one_image_placeholder(query_num) * cols
    return SLICE_START + "\n".join([row] * rows) + SLICE_END


def image_placeholder(image_size: tuple[int, int], config) -> str:
    """The placeholder string of an image of (width, height) for a MiniCPMVConfig."""
    text = one_image_placeholder(config.query_num)
    if not config.slice_mode:
        return text
    grid = best_grid(image_size, config.max_slice_nums, config.scale_resolution)
    return text if grid is None else text + grid_placeholder(grid, config.query_num)


def chat_prompt(msgs: list[dict[str, Any]], placeholder: str | None) -> str:
    """The official chat() prompt; `placeholder` (or None: no image) opens the first message."""
    return images_chat_prompt(msgs, {0: [placeholder]} if placeholder is not None else {})


def images_chat_prompt(msgs: list[dict[str, Any]], placeholders: dict[int, list[str]],
                       generation_prompt: bool = True) -> str:
    """The chat layout with images in any message: `placeholders[i]` open message i, each
    followed by a newline, as the official chat() opens the first message with its one image
    (what OpenAI-style messages with image parts need). `generation_prompt`: end with `<AI>`."""
    check_messages(msgs)
    prompt = ""
    for i, msg in enumerate(msgs):
        content = "".join(p + "\n" for p in placeholders.get(i, ())) + msg["content"]
        prompt += (USER if msg["role"] == "user" else ASSISTANT) + content
    return prompt + ASSISTANT if generation_prompt else prompt


def check_messages(msgs: Any) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise MiniCPMError("msgs must be a non-empty list of {'role', 'content'} messages")
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise MiniCPMError(f"message {i} must be a dict with 'role' and 'content'")
        if msg["role"] not in ("user", "assistant"):
            raise MiniCPMError(f"message {i} has role {msg['role']!r}; MiniCPM-V knows 'user' and 'assistant'")
        if not isinstance(msg["content"], str):
            raise MiniCPMError(f"message {i}: content must be a string (MiniCPM-V 2.0 takes the image "
                               f"as chat(image=...)), not {type(msg['content']).__name__}")
    if msgs[0]["role"] != "user":
        raise MiniCPMError("the first message must be the user's")


def image_bounds(input_ids: torch.Tensor, im_start_id: int, im_end_id: int) -> torch.Tensor:
    """Half-open [start, end) spans [k, 2] of the positions between each `<image>` and its
    `</image>` in ids [S]: where the k-th image's features go."""
    starts = torch.nonzero(input_ids == im_start_id).flatten() + 1
    ends = torch.nonzero(input_ids == im_end_id).flatten()
    if len(starts) != len(ends) or bool((ends < starts).any()):
        raise MiniCPMError("the prompt's <image> and </image> tokens do not pair up")
    return torch.stack([starts, ends], dim=1)
