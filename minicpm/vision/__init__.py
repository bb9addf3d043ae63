"""MiniCPM-V 2.0: images in, text out (a feature layer over the core decoder).

    model, tokenizer = minicpm.load("path/to/MiniCPM-V-2")
    answer, context, _ = model.chat(image=Image.open("photo.jpg"), msgs=[{"role": "user",
                                    "content": "What is in the picture?"}], tokenizer=tokenizer)

Map: `config` (MiniCPMVConfig: the decoder's config + vision tower and slicing fields),
`siglip` (the vision tower, `vpm.*`), `resampler` (`resampler.*`), `model` (MiniCPMV and the
embedding merge), `image` (opening, slicing, pixel values), `prompt` (placeholders, chat layout,
image bounds), `chat` (chat() with sampling or beam search, the per-conversation cache;
stream_chat() for the CLI), `beam` (beam search), `request` (a prompt with images for the
server's engine, encoded a batch of slices at a time), `loading` (assembling a model from
checkpoint tensors).
"""

from __future__ import annotations

from minicpm.vision.config import MiniCPMVConfig, SiglipConfig, is_minicpmv_config
from minicpm.vision.image import load_image, slice_image, to_pixel_values
from minicpm.vision.loading import build_minicpmv, random_minicpmv
from minicpm.vision.model import MiniCPMV
from minicpm.vision.prompt import image_bounds, image_placeholder

__all__ = ["MiniCPMV", "MiniCPMVConfig", "SiglipConfig", "build_minicpmv", "image_bounds",
           "image_placeholder", "is_minicpmv_config", "load_image", "random_minicpmv", "slice_image",
           "to_pixel_values"]
