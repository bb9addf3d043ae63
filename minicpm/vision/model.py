"""`MiniCPMV`: MiniCPM-V 2.0 = the SigLIP tower (`vpm`) + the resampler (`resampler`) + our
MiniCPM decoder, unchanged (`llm`). Parameter names are the released checkpoint's.

The embedding merge, as the official code does it: token embeddings times scale_emb, then the
rows inside each image bound replaced by that image's resampled features, which are not scaled.
The decoder then runs on those embeddings as given (its own embedding scale applies only to ids,
as in later decoding steps).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from minicpm.errors import MiniCPMError
from minicpm.kernels.allocator import return_free_heap
from minicpm.model import MiniCPMForCausalLM
from minicpm.vision.chat import chat
from minicpm.vision.config import MiniCPMVConfig
from minicpm.vision.resampler import Resampler
from minicpm.vision.siglip import VisionTransformer


class MiniCPMV(nn.Module):
    def __init__(self, config: MiniCPMVConfig, llm: MiniCPMForCausalLM | None = None):
        super().__init__()
        self.config = config
        self.llm = llm if llm is not None else MiniCPMForCausalLM(config.llm)
        self.vpm = VisionTransformer(config.vision, config.vision_layers)
        self.resampler = Resampler(config.query_num, config.llm.hidden_size, config.vision.hidden_size)
        self.conversation = None  # the image and KV cache of the last chat (minicpm.vision.chat)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.vpm.pos_embed.dtype

    def get_vision_embedding(self, pixel_values: list[torch.Tensor],
                             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Slices [3, H, W] -> their resampled features [n, query_num, hidden], in order.

        Slices of one size run as one batch (the tiles of an image share a size); each slice
        still attends only to itself, so this is the official slice-by-slice result.
        `progress(done, total)` is called after each batch, with slices done so far."""
        out: list[torch.Tensor | None] = [None] * len(pixel_values)
        if progress is not None:
            progress(0, len(out))
        for indices, features in self.vision_embedding_steps(pixel_values):
            for i, row in zip(indices, features):
                out[i] = row
            if progress is not None:
                progress(sum(row is not None for row in out), len(out))
        return torch.stack(out)

    def vision_embedding_steps(self, pixel_values: list[torch.Tensor]
                               ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """get_vision_embedding a batch at a time: (slice indices, their features) per batch of
        one size, so a caller (the server's scheduler) can do other work between batches."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, pixels in enumerate(pixel_values):
            if pixels.dim() != 3 or pixels.shape[0] != 3:
                raise MiniCPMError(f"pixel values must be [3, H, W] tensors, got {list(pixels.shape)}")
            by_size[tuple(pixels.shape[-2:])].append(i)
        p = self.config.vision.patch_size
        for (h, w), indices in by_size.items():
            batch = torch.stack([pixel_values[i] for i in indices]).to(self.device)
            features = self.resampler(self.vpm.forward_features(batch), (-(-h // p), -(-w // p)))
            # The tower's freed activations stay in glibc's heap (its mmap threshold grows to 32 MB
            # after large frees): MiniCPM-V int4 decoder + bf16 tower kept ~650 MB after two images;
            # handed back after each batch, benchmarks/vision.py's peak 3417 -> 3121 MiB, same speed (Zen 4).
            return_free_heap()
            yield indices, features

    def embed(self, input_ids: torch.Tensor, vision_hidden_states: list[torch.Tensor | None],
              image_bound: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings [B, S, hidden]: scaled token embeddings with each row's image features
        [k, query_num, hidden] put into its bounds [k, 2] in order."""
        embeds = self.llm.model.embed_tokens(input_ids) * self.config.llm.scale_emb
        for row, (features, bounds) in enumerate(zip(vision_hidden_states, image_bound)):
            if features is None or len(features) == 0:
                continue
            bounds = torch.as_tensor(bounds, dtype=torch.long).reshape(-1, 2)
            positions = torch.cat([torch.arange(int(s), int(e)) for s, e in bounds]) if len(bounds) else None
            flat = features.reshape(-1, features.shape[-1])
            if positions is None or len(positions) != len(flat):
                raise MiniCPMError(f"row {row}: the image bounds cover {0 if positions is None else len(positions)} "
                                   f"positions but its images give {len(flat)} feature rows")
            embeds[row, positions.to(embeds.device)] = flat.to(embeds.dtype)
        return embeds

    def get_vllm_embedding(self, input_ids: torch.Tensor, pixel_values: list[list[torch.Tensor]] | None,
                           image_bound: list[torch.Tensor] | None,
                           vision_hidden_states: list[torch.Tensor | None] | None = None):
        """(embeddings, vision features per row), as the official method of this name."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch = input_ids.shape[0]
        if vision_hidden_states is None:
            pixel_values = pixel_values or [[] for _ in range(batch)]
            vision_hidden_states = [self.get_vision_embedding(list(p)) if len(p) else None
                                    for p in pixel_values]
        image_bound = image_bound if image_bound is not None else [torch.zeros(0, 2)] * batch
        if len(vision_hidden_states) != batch or len(image_bound) != batch:
            raise MiniCPMError(f"pixel_values and image_bound need one entry per row ({batch})")
        return self.embed(input_ids.to(self.device), vision_hidden_states, image_bound), vision_hidden_states

    def forward(self, input_ids: torch.Tensor, pixel_values: list[list[torch.Tensor]] | None = None,
                image_bound: list[torch.Tensor] | None = None, *,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                vision_hidden_states: list[torch.Tensor | None] | None = None,
                cache=None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, vocab] in fp32. `pixel_values[b]`: the (3, H, W) slices of row b's images
        in prompt order; `image_bound[b]`: LongTensor [k, 2] of their placeholder spans."""
        embeds, _ = self.get_vllm_embedding(input_ids, pixel_values, image_bound, vision_hidden_states)
        return self.llm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                        cache=cache, last_only=last_only)

    def chat(self, image, msgs, context=None, tokenizer=None, sampling: bool = True, **generation):
        """(answer, context, generation_config) as the official chat(); see minicpm.vision.chat.

        `image`: a PIL image, a path or bytes, or None; `msgs`: [{"role", "content"}, ...]
        starting with the user's; generation options: max_new_tokens (1024), max_inp_length
        (2048), vision_hidden_states, and the sampling options (or num_beams, repetition_penalty,
        length_penalty with sampling=False)."""
        return chat(self, image, msgs, context, tokenizer, sampling=sampling, **generation)

    def reset_conversation(self) -> None:
        """Forget the kept image features and KV cache (they go with the next other image anyway)."""
        self.conversation = None
