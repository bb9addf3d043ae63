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

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minicpm.config import MiniCPMConfig
from minicpm.kernels.attention import decode_attention
from minicpm.kernels.linear import decode_linear


class KVCache:
    """Preallocated keys and values for every layer, [batch, kv_heads, max_len, head_dim].

    Two ways to use it. As one batch: all rows share one write position (`length`); left padding
    is handled by the attention mask, so a batch of different prompt lengths still advances in
    lockstep. As independent slots (the serving engine): each row holds its own sequence at its
    own length, which the caller tracks; `view(slot, length)` prefills one slot and
    `write_rows`/`attend_rows` decode one token for several slots at their own positions.
    """

    STORES = ("keys", "values")  # attribute names of the per-layer tensor lists

    def __init__(self, config: MiniCPMConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        self.shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.dtype = dtype  # of the keys/values handed to attention
        # empty, not zeros: slots past `length` are never read, and untouched pages of a long
        # context cost no memory until they are written
        self.keys = self._allocate(config.num_hidden_layers, self.shape, dtype, device)
        self.values = self._allocate(config.num_hidden_layers, self.shape, dtype, device)
        self.max_len = max_len
        self.length = 0

    @staticmethod
    def _allocate(layers: int, shape: tuple, dtype: torch.dtype, device: Any) -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store this step's k/v at the current position; returns the new end position."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return end

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, end), [batch, kv_heads, end, head_dim]."""
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v at the current position; return all keys/values so far."""
        return self.read(layer, self.write(layer, k, v))

    def attend(self, layer: int, q: torch.Tensor, end: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Attention of a single query per row over positions [0, end), straight from the
        stores by the native kernel (fp32 result); None where it does not serve."""
        return decode_attention(q, self.keys[layer], self.values[layer], end, mask, *self._scales(layer))

    def _scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None  # keys and values are stored as they are

    # ---- independent slots (rows at their own lengths)

    def view(self, slot: int, length: int) -> KVCache:
        """Row `slot` as a batch-1 cache holding `length` positions; it shares this cache's
        memory, so running the model on it (a prefill chunk) fills the slot."""
        view = copy.copy(self)
        for name in self.STORES:
            setattr(view, name, [t[slot:slot + 1] for t in getattr(self, name)])
        view.shape = (1,) + self.shape[1:]
        view.length = length
        return view

    def write_rows(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
        """One new token per row: k/v [B, KV, 1, D] row i goes to slot rows[i] at positions[i]."""
        self.keys[layer][rows, :, positions] = k[:, :, 0]
        self.values[layer][rows, :, positions] = v[:, :, 0]

    def read_row(self, layer: int, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one slot's positions [start, end), [1, kv_heads, end - start, head_dim]."""
        return (self.keys[layer][slot:slot + 1, :, start:end],
                self.values[layer][slot:slot + 1, :, start:end])

    def attend_rows(self, layer: int, q: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor | None,
                    ends: torch.Tensor, bound: int) -> torch.Tensor:
        """Attention of q [B, H, 1, D], row i over positions [starts[i], ends[i]) of slot rows[i]
        (starts None: from 0; bound = max(ends)). A row's result never depends on the other rows:
        the kernel reduces each over its own positions only, and so does the PyTorch loop."""
        out = decode_attention(q, self.keys[layer], self.values[layer], bound, None, *self._scales(layer),
                               rows=rows, starts=starts, ends=ends)
        if out is not None:
            return out
        firsts = [0] * len(rows) if starts is None else starts.tolist()
        return torch.cat([attention(q[i:i + 1], *self.read_row(layer, row, first, end), None)
                          for i, (row, first, end) in enumerate(zip(rows.tolist(), firsts, ends.tolist()))])

    def copy_prefix(self, other: KVCache, keep: int) -> None:
        """Take the first `keep` positions of `other` (same layout; a conversation outgrew it)."""
        for mine, theirs in zip(self._stores(), other._stores()):
            mine[:, :, :keep] = theirs[:, :, :keep]

    def _stores(self) -> list[torch.Tensor]:
        return [t for name in self.STORES for t in getattr(self, name)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stores())

    def reset(self) -> None:
        self.length = 0


class Int8KVCache(KVCache):
    """Keys and values as int8 with one scale per (token, head): half of a bf16 cache.

    MiniCPM-2B has no GQA, so its bf16 cache takes 0.37 MB per token (750 MB at 2k tokens);
    the int8 one 0.2 MB. Symmetric absmax rounding per head vector, as llama.cpp's q8_0 cache
    does per 32 values. The native decode kernel reads the codes directly; PyTorch's attention
    (prefill, or no native kernel) gets dequantized copies of the layer it works on.
    """

    STORES = ("keys", "values", "key_scales", "value_scales")

    def __init__(self, config: MiniCPMConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__(config, batch_size, max_len, torch.int8, device)
        self.dtype = dtype
        scale_shape = self.shape[:3] + (1,)  # fp32: what the native kernel reads, 6% of the codes
        self.key_scales = self._allocate(config.num_hidden_layers, scale_shape, torch.float32, device)
        self.value_scales = self._allocate(config.num_hidden_layers, scale_shape, torch.float32, device)

    @staticmethod
    def _quantize(new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and fp32 scales [..., 1] of head vectors [..., D]."""
        scale = (new.abs().amax(-1, keepdim=True).float() / 127).clamp(min=1e-8)
        return torch.round(new.float() / scale).to(torch.int8), scale

    def _coded(self) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], ...]:
        return (self.keys, self.key_scales), (self.values, self.value_scales)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        start, end = self.length, self.length + k.shape[2]
        for (store, scales), new in zip(self._coded(), (k, v)):
            store[layer][:, :, start:end], scales[layer][:, :, start:end] = self._quantize(new)
        return end

    def write_rows(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
        for (store, scales), new in zip(self._coded(), (k, v)):
            store[layer][rows, :, positions], scales[layer][rows, :, positions] = self._quantize(new[:, :, 0])

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantized(layer, (slice(None), slice(None), slice(0, end)))

    def read_row(self, layer: int, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantized(layer, (slice(slot, slot + 1), slice(None), slice(start, end)))

    def _dequantized(self, layer: int, part: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple((store[layer][part].float() * scales[layer][part]).to(self.dtype)
                     for store, scales in self._coded())

    def _scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_scales[layer], self.value_scales[layer]


class SlotStep:
    """What the layers see of the cache while decoding one token for several slots at once:
    row i writes at positions[i] of slot rows[i] and attends to that slot's positions up to it
    (the last `window` of them with a sliding window). Same protocol as KVCache (write, attend)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, positions: torch.Tensor, window: int | None):
        self.cache, self.rows, self.positions = cache, rows, positions
        self.ends = positions + 1
        self.starts = None if window is None else (self.ends - window).clamp(min=0)
        self.bound = int(self.ends.max())

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write_rows(layer, self.rows, self.positions, k, v)

    def attend(self, layer: int, q: torch.Tensor, end: None, mask: None) -> torch.Tensor:
        return self.cache.attend_rows(layer, q, self.rows, self.starts, self.ends, self.bound)


KV_CACHE_DTYPES = ("auto", "int8")


class Linear(nn.Linear):
    """nn.Linear whose decode-sized products (a few rows of x) run the native weight-stream
    kernels: PyTorch's bf16 GEMV reads the weight at about half of the memory bandwidth here,
    and MKL's fp32 results for a row change with the number of rows (batched decoding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = decode_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if y is None else y


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
    """x [B, H, S, D] rotated in fp32 and cast back; cos/sin [B, S, D]."""
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
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, mask)
        else:
            end = cache.write(self.layer_idx, k, v)
            # decoding: the native kernel reads the cache as stored (None where it cannot)
            out = cache.attend(self.layer_idx, q, end, mask) if s == 1 else None
            if out is None:
                out = attention(q, *cache.read(self.layer_idx, end), mask)
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(b, s, -1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """PyTorch attention; mask None means causal (several queries) or everything (one query)."""
    s = q.shape[2]
    if s == 1 and q.dtype != torch.float32:
        return single_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row (decoding) as two batched matmuls, softmax in fp32.

    PyTorch's CPU SDPA is slow for a single bf16 query: with 24 heads over 8 kv heads it took
    1.0 ms at 512 keys and 4.3 ms at 2048, against 0.26 and 1.0 ms this way (fp32 SDPA is fine).
    """
    b, h, _, d = q.shape
    kv = k.shape[1]
    rows = q.reshape(b, kv, h // kv, d)  # the query heads that share a kv head, as matrix rows
    scores = torch.matmul(rows, k.transpose(-1, -2)).float() * d ** -0.5  # [b, kv, h/kv, keys]
    if mask is not None:  # [b, 1, 1, keys]
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, 1, d)


def _activation(config: MiniCPMConfig):
    if config.hidden_act == "silu":
        return F.silu
    threshold = config.hidden_act_param if config.hidden_act == "fatrelu" else 0.0
    # FATReLU (MiniCPM-S): keep z where z > threshold, zero elsewhere; ReLU is threshold 0.
    return lambda z: torch.where(z > threshold, z, torch.zeros((), dtype=z.dtype, device=z.device))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
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

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache) * self.residual_scale
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale
        return x


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
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.config = config
        self.kv_cache_dtype = "auto"  # what new_cache makes: the model's dtype, or "int8"
        # training: recompute each layer's activations in the backward pass instead of keeping them
        self.gradient_checkpointing = False
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
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, vocab] in fp32 (only the last position with `last_only`).

        attention_mask [B, past + S] (1 = real token, 0 = padding) covers everything in the
        cache plus the new tokens. `inputs_embeds` are used as given (no embedding scale), as
        the official code does for multimodal callers.
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
        mask = _attention_mask(attention_mask, past, s, self.config.sliding_window, x.device)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += s
        return self._logits(x[:, -1:] if last_only else x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.config.embedding_scale

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x)
        return self.lm_head(x / self.config.logit_scale).float()

    def prefill_slot(self, input_ids: torch.Tensor, cache: KVCache, slot: int, start: int,
                     last_only: bool = True) -> torch.Tensor:
        """Run ids [S] as positions [start, start + S) of one cache row ("slot") that already
        holds `start` positions; logits [S, vocab] (or [1, vocab] with `last_only`)."""
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
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, step)
        return self._logits(x)[:, 0]

    def new_cache(self, batch_size: int, max_len: int, kv_dtype: str | None = None) -> KVCache:
        """An empty cache; `kv_dtype` "int8" halves its memory (default: `self.kv_cache_dtype`)."""
        kind = kv_dtype or self.kv_cache_dtype
        if kind not in KV_CACHE_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kind!r}")
        cls = Int8KVCache if kind == "int8" else KVCache
        return cls(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def generate(self, input_ids, max_new_tokens: int = 128, **sampling: Any):
        """New token ids for each prompt; temperature 0 (the default) is greedy.

        `input_ids`: a list of ids, a list of such lists (batched, left-padded internally) or a
        [B, S] tensor. Returns a [B, new] tensor (rows that stopped early padded with the pad
        id) for tensor input, otherwise lists. See `minicpm.generation.generate`.
        """
        from minicpm.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **sampling)

    def chat(self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user",
             **sampling: Any) -> tuple[str, list[dict]]:
        """The official `chat()`: returns (response, history) with the reply appended."""
        from minicpm.generation.chat import chat

        return chat(self, tokenizer, query, history=history, role=role, **sampling)


def _positions(attention_mask: torch.Tensor | None, past: int, s: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + s, device=device)[None]
    # Left padding: count only real tokens; pad slots get position 0 (they are masked anyway).
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past:past + s]


def _attention_mask(attention_mask: torch.Tensor | None, past: int, s: int,
                    window: int | None, device) -> torch.Tensor | None:
    """Boolean [B, 1, S, past+S] mask (True = may attend), or None for plain causal."""
    if attention_mask is None and window is None and (past == 0 or s == 1):
        return None  # SDPA's is_causal (prefill) or no mask at all (one new token)
    total = past + s
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


def _diagonal(s: int, past: int, device) -> torch.Tensor:
    q_pos = torch.arange(past, past + s, device=device)[:, None]
    k_pos = torch.arange(past + s, device=device)[None, :]
    return (k_pos == q_pos)[None, None]
