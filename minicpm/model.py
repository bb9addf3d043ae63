"""The MiniCPM decoder, in one file, with Hugging Face parameter names.

MiniCPM is a Llama-style pre-norm decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP) plus
three muP scalings that appear below as explicit lines:

    x      = embed_tokens(ids) * scale_emb                       # embedding scale
    x      = x + branch(x) * scale_depth / sqrt(num_layers)      # residual scale, every branch
    logits = lm_head(norm(x) / (hidden_size / dim_model_base))   # logit scale

Variants are config fields, never name checks: GQA (num_key_value_heads), tied or untied head,
rope scaling (linear / dynamic NTK / llama3), mixture of experts (num_experts), FATReLU
(MiniCPM-S). A Llama checkpoint is this model with neutral scalings.

Precision follows the official code: RMSNorm statistics, rotary embedding and softmax in fp32,
logits returned as fp32, everything else in the parameter dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minicpm.cache import Int4KVCache, Int8KVCache, KVCache, SlotStep, make_cache
from minicpm.config import MiniCPMConfig
from minicpm.kernels import rotary
from minicpm.kernels.attention import LeftPadding, attention
from minicpm.kernels.decode import NativeDecoder
from minicpm.kernels.linear import native_linear


class Linear(nn.Linear):
    """nn.Linear whose decode-sized products (a few rows of x) run the native weight-stream
    kernels: PyTorch's bf16 GEMV reads the weight at about half of the memory bandwidth here,
    and MKL's fp32 results for a row change with the number of rows (batched decoding). On a
    CPU without bf16 arithmetic, bf16 prefill products run as fp32 GEMMs (`linear_widened`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if y is None else y

    def decode_spec(self) -> dict:
        """What the native decode step needs (minicpm.kernels.decode): the weight it streams."""
        return {"kind": "stream", "weight": self.weight, "bias": self.bias}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, as one op (bitwise equal to spelling it out)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables in fp32 for given positions ("rotate-half" layout, full head dim)."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_positions = config.max_position_embeddings
        self.scaling = config.rope_scaling or {}
        self.kind = self.scaling.get("rope_type", "default")
        inv_freq = self._inv_freq(self.base)
        if self.kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, base: float) -> torch.Tensor:
        # Always a real CPU tensor, also while the model is built on the meta device.
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu") / self.dim
        return 1.0 / (base ** exponents)

    def forward(self, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S]; seq_len = total length so far (dynamic NTK rescales past it)."""
        inv_freq = self.inv_freq.to(position_ids.device)
        positions = position_ids.float()
        if self.kind == "linear":
            positions = positions / self.scaling["factor"]
        elif self.kind == "dynamic" and seq_len > self.max_positions:
            # NTK-aware: raise the base for the current length. Keys already cached keep the
            # rotation of their time (as the official implementation does while generating).
            factor = self.scaling["factor"]
            base = self.base * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (
                self.dim / (self.dim - 2))
            inv_freq = self._inv_freq(base).to(position_ids.device)
        freqs = positions[..., None] * inv_freq  # [B, S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling (long wavelengths slowed by `factor`)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated in fp32 and cast back; cos/sin [B, S, D]. The native kernel gives
    this expression's values (and gradients) bitwise, in one pass instead of five."""
    native = rotary.apply(x, cos, sin)
    if native is not None:
        return native
    cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None, real: RealTokens | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if real is None:
            out = self._attend(q, k, v, cos, sin, mask, cache)
        elif real.lengths is not None:  # x: the batch's real tokens [N, D], each row's a prefix
            out = self._attend_by_row(q, k, v, cos, sin, real)
        else:  # x: the batch's real tokens [N, D], back in their [B, S] places for the mask
            out = real.take(self._attend(real.put(q), real.put(k), real.put(v), cos, sin, mask, None))
        return self.o_proj(out.to(x.dtype))

    def _attend_by_row(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, real: RealTokens) -> torch.Tensor:
        """Causal attention of each right-padded row over its own real tokens, from the batch's
        real rows [N, F]: no padding is scattered back, and no masked S x S is computed (a masked
        SDPA cannot skip the blocks above the diagonal; PyTorch's CPU flash attention, fwd + bwd
        of 8 rows of 9 heads at 512: 150 ms masked, 81 ms a row at a time)."""
        # split, not slices: its backward is one concatenation (a slice's fills all N rows with zeros)
        parts = zip(real.lengths, q.split(real.lengths), k.split(real.lengths), v.split(real.lengths))
        rows = [self._attend(qr[None], kr[None], vr[None], cos[row:row + 1, :n], sin[row:row + 1, :n], None, None)
                for row, (n, qr, kr, vr) in enumerate(parts) if n]
        return torch.cat(rows, dim=1)[0]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """Projections [B, S, heads * head_dim] -> attention's output [B, S, heads * head_dim]
        (the kernel's dtype)."""
        b, s, _ = q.shape
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, mask)
        else:
            end = cache.write(self.layer_idx, k, v)
            # the native kernels read the cache as stored (None where they cannot)
            if s == 1:
                out = cache.attend(self.layer_idx, q, end, mask)
            else:
                out = cache.attend_prefill(self.layer_idx, q, end, mask)
            if out is None:
                out = attention(q, *cache.read(self.layer_idx, end), mask)
        return out.transpose(1, 2).reshape(b, s, -1)


def _activation(config: MiniCPMConfig):
    if config.hidden_act == "silu":
        return F.silu
    threshold = config.hidden_act_param if config.hidden_act == "fatrelu" else 0.0
    # FATReLU (MiniCPM-S): keep z where z > threshold, zero elsewhere; ReLU is threshold 0.
    return lambda z: torch.where(z > threshold, z, torch.zeros((), dtype=z.dtype, device=z.device))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)).

    With a thresholded activation (MiniCPM-S's FATReLU) most of act(gate(x)) is zero, and the
    native decode step reads only the active neurons' rows of up and of down's transpose: down's
    weight [hidden, intermediate] is stored as the transpose of [intermediate, hidden] memory, one
    contiguous row per neuron (the same values; PyTorch's products take the view as it is)."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
        if config.hidden_act != "silu":
            self.down_proj.weight = nn.Parameter(self.down_proj.weight.detach().t().contiguous().t())
        self.act = _activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One MiniCPM-MoE expert: w2(silu(w1 x) * w3 x), names as in the official checkpoint."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.w1 = Linear(d, f, bias=False)
        self.w2 = Linear(f, d, bias=False)
        self.w3 = Linear(d, f, bias=False)
        self.act = _activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k of softmax routing over all experts, the k weights renormalised to sum to 1."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # Decoding (one position per sequence), the gate and the experts see [N, 1, D], which
        # keeps them on the decode kernels: then a row's result does not depend on the batch.
        x = x.reshape(-1, 1, shape[-1]) if shape[-2] == 1 else x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32).reshape(x.shape[0], -1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                scale = weights[rows, slot].reshape(-1, *[1] * (x.dim() - 1))
                out.index_add_(0, rows, expert(x[rows]) * scale)
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.num_experts else MLP(config)
        self.residual_scale = config.residual_scale

    def forward(self, x, cos, sin, mask, cache, real: RealTokens | None = None):
        x = x + self._scaled(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, real))
        x = x + self._scaled(self.mlp(self.post_attention_layernorm(x)))
        return x

    def _scaled(self, branch: torch.Tensor) -> torch.Tensor:
        # llama-format checkpoints scale by 1: skip a pass over the activations (and its backward)
        return branch if self.residual_scale == 1 else branch * self.residual_scale


class MiniCPMModel(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        # An explicit weight skips nn.Embedding's own init, whose first call on the meta device
        # costs over a second of imports; MiniCPMForCausalLM initialises weights itself.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class MiniCPMForCausalLM(nn.Module):
    """The decoder with its head: `model(input_ids)` gives logits; `new_cache`, `prefill_slot`
    and `decode_slots` serve the generation loops. `generate()` and `chat()` are not defined
    here: `minicpm.generation` adds them (and `minicpm.load` imports it), so the decoder never
    depends on sampling or chat templates."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.config = config
        self.kv_cache_dtype = "auto"  # what new_cache makes: the model's dtype, or "int8"
        # training: recompute each layer's activations in the backward pass instead of keeping them
        self.gradient_checkpointing = False
        # decoding: all layers of a step in one native call (False: the Python layers, the reference)
        self.native_decode = True
        # ... and FATReLU layers read only their active neurons' rows of up and down (MiniCPM-S;
        # False: every neuron's, the dense cost, to compare)
        self.sparse_mlp = True
        self._native: NativeDecoder | None = None  # built at the first decode step
        self.model = MiniCPMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: N(0, initializer_range) for every Linear and Embedding."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.initializer_range)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def _apply(self, fn, *args, **kwargs):
        self._native = None  # .to() and friends move the tensors the native step points at
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        return {**super().__getstate__(), "_native": None}  # raw pointers: a copy builds its own

    def _native_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                       rows: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor | None = None,
                       ends: torch.Tensor | None = None, length: int = 0,
                       mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """x after every layer by the native decode step, or None where it does not serve (see
        NativeDecoder.run); then nothing was written and the Python layers run."""
        if not self.native_decode or torch.is_grad_enabled() or type(cache) not in (KVCache, Int8KVCache, Int4KVCache):
            return None
        native = self._native
        if native is None or not native.describes(self):  # first step, or a projection was swapped
            native = self._native = NativeDecoder(self)
        if not native.ready:
            return None
        return native.run(x, cos, sin, cache, rows, positions, starts, ends, length, mask)

    # Read from the final norm: the embedding may be swapped for a quantized table.
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(self, input_ids: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None,
                last_only: bool = False, hidden: bool = False, skip_padding: bool = False) -> torch.Tensor:
        """Logits [B, S, vocab] in fp32 (only the last position with `last_only`). With `hidden`:
        the final-norm hidden states [B, S, hidden_size] instead, which `project` turns into
        those logits a slice at a time (a caller scoring every position of a long window over a
        large vocabulary keeps only a slice's logits in memory).

        attention_mask [B, past + S] (1 = real token, 0 = padding) covers everything in the
        cache plus the new tokens; a boolean [B, 1, S, past + S] (True = may attend) is used as
        given (samples packed into one row keep to themselves), with `position_ids`. `inputs_embeds` are used as given (no embedding scale), as
        the official code does for multimodal callers. `skip_padding` (training): the layers run
        only on the positions attention_mask marks real; the padding's outputs are then those of
        zero hidden states, not of the pad tokens.
        """
        if inputs_embeds is None:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            x = self._embed(input_ids)
        else:
            x = inputs_embeds
        b, s, _ = x.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + s > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {past} + {s} do not fit")
        if position_ids is None:
            position_ids = _positions(attention_mask, past, s, x.device)
        cos, sin = self.model.rotary_emb(position_ids, past + s)
        real = (RealTokens.of(attention_mask, s, by_row=self.config.sliding_window is None)
                if skip_padding and cache is None else None)
        by_row = real is not None and real.lengths is not None  # attention needs no mask
        mask = None if by_row else _attention_mask(attention_mask, past, s, self.config.sliding_window, x.device)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        if real is not None:
            x = real.take(x)
        native = None
        if cache is not None and s == 1:  # decoding one token: all layers in one native call
            native = self._native_layers(x, cos, sin, cache, torch.arange(b), torch.full((b,), past),
                                         length=past + 1, mask=mask)
        if native is not None:
            x = native
        else:
            for layer in self.model.layers:
                if recompute:
                    x = checkpoint(layer, x, cos, sin, mask, None, real, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, mask, cache, real)
        if real is not None:
            x = real.put(x)
        if cache is not None:
            cache.length += s
        x = x[:, -1:] if last_only else x
        return self.model.norm(x) if hidden else self._logits(x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.config.embedding_scale

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.model.norm(x))

    def project(self, hidden: torch.Tensor, head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of final-norm hidden states (what `forward(..., hidden=True)` returns);
        `head_weight`: lm_head's weight as the caller holds it (e.g. already cast), instead of it."""
        scaled = hidden / self.config.logit_scale
        return (self.lm_head(scaled) if head_weight is None else F.linear(scaled, head_weight)).float()

    def prefill_slot(self, input_ids: torch.Tensor | None, cache: KVCache, slot: int, start: int,
                     last_only: bool = True, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run ids [S] (or input embeddings [S, hidden], used as given: a prompt with images)
        as positions [start, start + S) of one cache row ("slot") that already holds `start`
        positions; logits [S, vocab] (or [1, vocab] with `last_only`)."""
        if inputs_embeds is not None:
            return self(inputs_embeds=inputs_embeds[None], cache=cache.view(slot, start), last_only=last_only)[0]
        return self(input_ids[None], cache=cache.view(slot, start), last_only=last_only)[0]

    def decode_slots(self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """One new token for each of several slots at their own lengths: token input_ids[i]
        goes to position positions[i] of cache row rows[i] (all int64 [B]). Logits [B, vocab].

        Each row's result is what the same row would give alone, where the kernels allow (see
        KVCache.attend_rows): nothing here mixes rows. Dynamic NTK rope reads the longest row's
        length, which changes nothing while every row fits max_position_embeddings.
        """
        x = self._embed(input_ids[:, None])
        step = SlotStep(cache, rows, positions, self.config.sliding_window)
        cos, sin = self.model.rotary_emb(positions[:, None], step.bound)
        native = None
        if step.bound <= cache.max_len and 0 <= int(rows.min()) and int(rows.max()) < cache.batch_size:
            native = self._native_layers(x, cos, sin, cache, rows, positions, step.starts, step.ends, step.bound)
        if native is not None:
            x = native
        else:
            for layer in self.model.layers:
                x = layer(x, cos, sin, None, step)
        return self._logits(x)[:, 0]

    def new_cache(self, batch_size: int, max_len: int, kv_dtype: str | None = None) -> KVCache:
        """An empty cache; `kv_dtype` "int8" halves its memory (default: `self.kv_cache_dtype`)."""
        return make_cache(self.config, batch_size, max_len, kv_dtype or self.kv_cache_dtype,
                          dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class RealTokens:
    """The real positions of a padded batch (`skip_padding`): the layers' products, norms and
    residuals run on those N rows only. Attention takes right-padded rows one at a time from
    the N rows; other layouts it puts back in their [B, S] places (zeros at the padding, which
    the mask keeps every real query off). Padding was ~30% of the positions of the default SFT
    batches (rows of 53-512 tokens padded to 512), all of it projected, normed and
    differentiated for nothing."""

    index: torch.Tensor  # [N] flat positions in [B * S]
    batch: int
    length: int
    lengths: tuple[int, ...] | None = None  # the rows' real lengths when each is a prefix (right padding)

    @staticmethod
    def of(attention_mask: torch.Tensor | None, length: int, by_row: bool = True) -> RealTokens | None:
        """For a [B, length] 0/1 mask with some padding; None otherwise (nothing to leave out).
        `by_row`: attention may run row by row over right-padded rows (plain causal attention,
        no sliding window)."""
        if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[-1] != length:
            return None
        real = attention_mask.bool()
        if bool(real.all()):
            return None
        counts = real.sum(-1)
        prefix = by_row and torch.equal(real, torch.arange(length, device=real.device) < counts[:, None])
        return RealTokens(real.flatten().nonzero()[:, 0], *real.shape, tuple(counts.tolist()) if prefix else None)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, F] -> the real rows [N, F]."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def put(self, rows: torch.Tensor) -> torch.Tensor:
        """The real rows [N, F] -> [B, S, F], zeros at the padding."""
        out = rows.new_zeros(self.batch * self.length, rows.shape[-1])
        return out.index_copy(0, self.index, rows).view(self.batch, self.length, -1)


def _positions(attention_mask: torch.Tensor | None, past: int, s: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + s, device=device)[None]
    if attention_mask.dim() == 4:
        raise ValueError("a [B, 1, S, S] attention mask needs position_ids")
    # Left padding: count only real tokens; pad slots get position 0 (they are masked anyway).
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past:past + s]


def _attention_mask(attention_mask: torch.Tensor | None, past: int, s: int,
                    window: int | None, device) -> torch.Tensor | LeftPadding | None:
    """Boolean [B, 1, S, past+S] mask (True = may attend), None for plain causal (the S new
    positions after the `past` cached ones), or LeftPadding for that in a left-padded batch (see
    kernels/attention.py `attention`)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask  # built by the caller (packed samples)
    if attention_mask is None and window is None:
        return None  # causal (a prompt, or a chunk after cached positions) or one new token
    total = past + s
    if s > 1 and window is None:  # a left-padded batch: the native kernel runs each row on its own
        padding = _left_padding(attention_mask[:, :total])
        if padding is not None:
            return padding
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
        # A query on a pad slot would see no key at all; let it see itself to avoid NaN.
        allowed = allowed | _diagonal(s, past, device)
    return allowed


def _left_padding(attention_mask: torch.Tensor) -> LeftPadding | None:
    """LeftPadding for a [B, L] mask whose rows are zeros then ones; None for any other shape."""
    real = attention_mask.bool()
    starts = (~real).sum(-1)
    positions = torch.arange(real.shape[-1], device=real.device)[None]
    if not torch.equal(real, positions >= starts[:, None]):
        return None
    return LeftPadding(tuple(starts.tolist()))


def _diagonal(s: int, past: int, device) -> torch.Tensor:
    q_pos = torch.arange(past, past + s, device=device)[:, None]
    k_pos = torch.arange(past + s, device=device)[None, :]
    return (k_pos == q_pos)[None, None]
