"""A MiniCPM/Llama decoder from a quantized GGUF file, run by the native kernels from numpy.

The same arithmetic as `minicpm.model` with its native decode step, without PyTorch:

    x      = embedding rows (dequantized as stored) * scale_emb
    x      = decode.c's layers (RMSNorm, q/k/v, rotary, cache write, attention, o, residual
             scale, RMSNorm, gate/up, SiLU, down) for up to CHUNK positions at a time
    logits = lm_head(norm(x) / (hidden_size / dim_model_base))   (qgemm.c, from the last row)

A prompt runs as chunks of CHUNK positions through the decode step (each row attends to the
cache up to its own position), so prefill and decode are one code path. The weights are the
GGUF blocks repacked exactly (`formats.gguf.repack`: no re-rounding); the KV cache is fp16 (the
default, as llama.cpp's), fp32, bf16, int8 or int4 (`lean.cache`).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError
from minicpm.formats.gguf.container import GGUFFile, GGUFTensorInfo
from minicpm.formats.gguf.dequantize import to_float32
from minicpm.formats.gguf.layout import deinterleave_rope_rows, rope_heads
from minicpm.formats.gguf.metadata import SUPPORTED_ARCHITECTURES, config_from_metadata
from minicpm.formats.gguf.repack import REPACKED_TYPES, q4_k_superblocks, q6_k_superblocks, repacked_parts
from minicpm.kernels import decode_abi
from minicpm.kernels import qgemm_layout as layout
from minicpm.lean.cache import LeanCache
from minicpm.lean.native import Kernels, packed_plan

# Positions per decode-step call. Every product here is a qgemm plan, which takes any number of
# rows (the PyTorch model's step stops at 16, where its float weight streams give way to GEMM).
# 512-token prefill on 2 threads (Zen 4), chunks of 16 / 64 / 128 / 256: SmolLM2 Q4_1 908 / 1051
# / 1085 / 931 tok/s; MiniCPM-2B q4_0 at 64 / 128 / 256: 63 / 69 / 66 tok/s. The step's buffers
# grow with it (MiniCPM-2B at 256 rows: ~130 MB above the weights, at 64: ~30 MB).
CHUNK = 128
# Rows of a weight repacked at a time (a multiple of the tiles' 16): MiniCPM-2B's Q6_K head
# (122,753 x 2,304) decoded whole made 1.2 GB of numpy intermediates at load.
REPACK_ROWS = 4096
# Q4_0 through qgemm's zero-point-8 form: 18 bytes read per 32 weights, as in the file, instead of
# 20 with the offsets (-8d) the PyTorch model's layers hold. The same values; the sums round
# differently (s * (dot - 8 sum x) against s * dot - 8d sum x), so tests comparing the two
# runtimes step for step turn it off.
Q4_0_SYMMETRIC = True
# GGUF super-block types qgemm's form 3 reads as stored: type -> (bits, group, decoder).
# Q4_K: fp16 d and dmin, 6-bit scales and mins (2.5 bytes per 32 weights) instead of form 1's fp32
# products (8 bytes); the same values and sums. MiniCPM-2B-shaped Q4_K_M file, one run each:
# decode 15.5 -> 17.1 tok/s (llama.cpp 12.2), peak 2.66 -> 2.35 GB.
# Q6_K (the head of llama.cpp's q4_0 and Q4_K_M files, some of Q4_K_M's layers): 6-bit codes,
# int8 scales per 16, fp16 d per 256 (0.82 bytes a weight) instead of int8 codes with fp32 scales
# (1.25). MiniCPM-1B's head product 3.65 -> 2.4-2.9 ms; MiniCPM-2B's head 354 -> 232 MB.
SUPERBLOCK_FORMS = {"Q4_K": (4, 32, q4_k_superblocks), "Q6_K": (6, 16, q6_k_superblocks)}
HEADS = ("stored", "int4")  # the output head as the file stores it, or rounded again to int4
PROJECTIONS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
               "up": "ffn_up", "down": "ffn_down"}


def unsupported(file: GGUFFile, config: MiniCPMConfig) -> str | None:
    """Why the lean runtime cannot run this GGUF file (of `file_config(file)`) as stored (None: it can)."""
    if config.num_experts:
        return "mixture-of-experts layers"
    if config.hidden_act != "silu":  # as llama.cpp's graphs (our GGUF writer refuses others too)
        return f"hidden_act {config.hidden_act!r}"
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return f"rope scaling {scaling}"
    if config.head_dim % 16 or config.head_dim > 256 or config.sliding_window:
        return "its attention shape"
    for t in file.tensors:
        if t.name.endswith(".bias"):
            return f"bias tensors ({t.name})"
        head = t.name != "token_embd.weight" or config.tie_word_embeddings  # the tied table is the head too
        if len(t.shape) == 2 and head and t.tensor_type.name not in REPACKED_TYPES:
            return f"tensor {t.name} of type {t.tensor_type.name} (runs as stored: {', '.join(REPACKED_TYPES)})"
    return None


@dataclass
class Weights:
    """What the layers read, kept alive for as long as the structs point into it."""
    layers: object        # ctypes array of decode_abi.Layer
    norms: list           # fp32 arrays the layer structs point at
    plans: list           # qgemm plans the layer structs point at
    final_norm: np.ndarray
    head: layout.Plan
    embedding: tuple      # (GGUFTensorInfo, file): rows dequantized on demand


def packed_bytes(info: GGUFTensorInfo, int4: bool = False) -> int:
    """Bytes of a 2-D block tensor packed for qgemm (`_plan`): whole tiles of 16 rows of its codes
    (`_tile_bytes`)."""
    return -(-info.shape[0] // layout.ROWS) * _tile_bytes(_bits(info, int4), info.shape[1])


def _superblocks(info: GGUFTensorInfo, int4: bool) -> bool:
    """Whether qgemm reads this tensor's super-blocks as stored (form 3)."""
    return not int4 and info.tensor_type.name in SUPERBLOCK_FORMS


def _bits(info: GGUFTensorInfo, int4: bool) -> int:
    """The qgemm width of a tensor's codes as `_plan` packs them."""
    if _superblocks(info, int4):
        return SUPERBLOCK_FORMS[info.tensor_type.name][0]
    return 4 if int4 or info.tensor_type.name in ("Q4_0", "Q4_1") else 8


def _tile_bytes(bits: int, k: int) -> int:
    """Bytes of one tile of 16 rows: int4 half a byte a weight, int6 3/4, int8 a byte (k padded to 32)."""
    return layout.ROWS * layout.padded_k(bits, k, None) * bits // 8


def _plan(file: GGUFFile, info: GGUFTensorInfo, config: MiniCPMConfig, weight: np.ndarray,
          int4: bool = False) -> layout.Plan:
    """A GGUF block tensor as a qgemm plan, its codes packed into `weight` (uint8 of
    packed_bytes(info, int4)): codes and metadata as stored, q/k rows in HF order (`int4`: rounded
    again to int4 groups of 32, `rtn_int4`). REPACK_ROWS rows at a time (q/k whole: their rows
    move within heads)."""
    data = file.tensor_data(info)
    heads = rope_heads(info.name, config)
    n, k = info.shape
    superblocks = _superblocks(info, int4)
    step = n if heads is not None else REPACK_ROWS
    metas = ([], [])
    for first in range(0, n, step):
        bits, group, codes, scales, offsets, nibbles = _parts(data[first:first + step], info, int4, superblocks)
        if heads is not None:
            codes, scales = deinterleave_rope_rows(codes, heads), deinterleave_rope_rows(scales, heads)
            offsets = None if offsets is None else deinterleave_rope_rows(offsets, heads)
        tile_bytes = _tile_bytes(bits, k)
        out = weight[first // layout.ROWS * tile_bytes:][:-(-len(codes) // layout.ROWS) * tile_bytes]
        if nibbles:
            layout.pack_int4_blocks(codes, out)
        elif bits == 4:
            layout.pack_int4(codes, out)
        elif bits == 6:
            layout.pack_int6(codes, out)
        else:
            layout.pack_int8(codes, layout.padded_k(8, k, group), out)
        for found, meta in zip(metas, (scales, offsets)):
            if meta is not None:
                found.append(layout.pack_superblock_meta(meta, bits) if superblocks else layout.pack_meta(meta))
        file.release(info, first * data.shape[1], len(codes) * data.shape[1])  # as it goes: a 2B head is 232 MB
    scales, offsets = (np.concatenate(m) if m else None for m in metas)
    if offsets is not None and offsets.dtype != scales.dtype:  # Q4_0's -8d beyond fp16: fp32 both (exact)
        scales, offsets = scales.astype(np.float32), offsets.astype(np.float32)
    return packed_plan(bits, group, weight, scales, offsets, n, k, superblocks)


def _parts(rows: np.ndarray, info: GGUFTensorInfo, int4: bool, superblocks: bool = False):
    """Some rows of a block tensor as (bits, group, codes, scales, offsets or None, whether the
    codes are GGUF's Q4_0/Q4_1 nibbles): as stored, or (`int4`) rounded again by rtn_int4;
    `superblocks` (Q4_K, Q6_K): the scales are its super-blocks' metadata (q4_k_superblocks,
    q6_k_superblocks)."""
    name = info.tensor_type.name
    if int4:
        return *rtn_int4(to_float32(rows, info.tensor_type).reshape(len(rows), -1)), False
    if superblocks:
        bits, group, split = SUPERBLOCK_FORMS[name]
        return bits, group, *split(rows), None, False
    bits, group, codes, scales, offsets = repacked_parts(rows, name)
    if name == "Q4_0" and Q4_0_SYMMETRIC:
        offsets = None  # -8d: qgemm's form 2 computes (q - 8) * d, the stored value, from d alone
    return bits, group, codes, scales, offsets, name in ("Q4_0", "Q4_1")


def rtn_int4(w: np.ndarray, group: int = 32):
    """Round-to-nearest int4 of fp32 rows [N, K] with a scale and a minimum per group, as
    repacked_parts gives them: (4, group, codes uint8 [N, K], scales, mins [N, K/G] fp16) with
    w ~ codes * scale + min. The codes are rounded against the fp16 metadata the kernel reads."""
    g = w.reshape(len(w), -1, group)
    low, high = g.min(-1), g.max(-1)
    meta = np.float16 if np.all(np.abs(np.stack((low, high))) < 6e4) else np.float32
    scale = np.maximum((high - low) / 15, np.float32(2 ** -14)).astype(meta)  # fp16's smallest normal
    low = low.astype(meta)
    q = np.rint((g - low[..., None].astype(np.float32)) / scale[..., None].astype(np.float32))
    return 4, group, np.clip(q, 0, 15).astype(np.uint8).reshape(w.shape), scale, low


def _float(file: GGUFFile, info: GGUFTensorInfo) -> np.ndarray:
    """A copy, never a view of the map: an F32 norm read through the map at every step faulted in
    whole page-cache folios around it (MiniCPM-2B's 81 norms: 155 MB resident)."""
    out = np.array(to_float32(file.tensor_data(info), info.tensor_type), dtype=np.float32, copy=True)
    file.release(info)
    return out


def read_weights(file: GGUFFile, config: MiniCPMConfig, kernels: Kernels, head: str = "stored") -> Weights:
    """The layers as stored; the head too, or (`head` "int4") rounded again to int4 groups of 32:
    MiniCPM-2B's Q6_K head repacks to 354 MB of int8, in int4 it is 177 MB."""
    if head not in HEADS:
        raise ValueError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    tensors = {t.name: t for t in file.tensors}

    def need(name: str) -> GGUFTensorInfo:
        if name not in tensors:
            raise CheckpointError(f"{file.path}: tensor {name} is missing")
        return tensors[name]

    embedding = need("token_embd.weight")
    matrices = [(need(f"blk.{i}.{stored}.weight"), False) for i in range(config.num_hidden_layers)
                for stored in PROJECTIONS.values()] + [(tensors.get("output.weight", embedding), head == "int4")]
    # every packed matrix in one block of huge pages: separate 32 MB arenas left a partly used
    # 2 MB page resident at the end of each (~40 MB on MiniCPM-2B)
    memory = layout.weight_buffer(sum(packed_bytes(info, int4) for info, int4 in matrices))
    packed = []
    for info, int4 in matrices:
        size = packed_bytes(info, int4)
        packed.append(_plan(file, info, config, memory[:size], int4))
        memory = memory[size:]
    layers = (decode_abi.Layer * config.num_hidden_layers)()
    norms, plans = [], packed[:-1]
    for i, struct in enumerate(layers):
        for field, stored in (("norm1", "attn_norm"), ("norm2", "ffn_norm")):
            norms.append(_float(file, need(f"blk.{i}.{stored}.weight")))
            setattr(struct, field, norms[-1].ctypes.data)
        for field, plan in zip(PROJECTIONS, plans[i * len(PROJECTIONS):]):
            setattr(struct, field, decode_abi.Proj(kernels.plan_team, ctypes.addressof(plan), None, None,
                                                   plan.N, plan.K, decode_abi.P_QGEMM))
    out = packed[-1]
    return Weights(layers, norms, plans, _float(file, need("output_norm.weight")), out, (embedding, file))


class LeanModel:
    """`forward(ids, start)`: logits of the last of `ids`, run at positions start.. of the one
    sequence this model holds in its KV cache (positions past `start` are forgotten first)."""

    def __init__(self, config: MiniCPMConfig, weights: Weights, kernels: Kernels, threads: int,
                 kv_cache: str = "auto"):
        self.config, self.weights, self.kernels, self.threads = config, weights, kernels, threads
        c = config
        self.inv_freq = (1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim))
                         ).astype(np.float32)
        self.cache = LeanCache(config, kv_cache)
        self.tokens: list[int] = []  # the ids whose keys and values the cache holds, in order

    @property
    def length(self) -> int:
        return len(self.tokens)

    def _rotary(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq
        emb = np.concatenate((freqs, freqs), axis=-1)
        return np.ascontiguousarray(np.cos(emb)), np.ascontiguousarray(np.sin(emb))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        info, file = self.weights.embedding
        rows = to_float32(file.read_rows(info, ids), info.tensor_type).reshape(len(ids), -1)
        return np.ascontiguousarray(rows * np.float32(self.config.embedding_scale), dtype=np.float32)

    def _layers(self, x: np.ndarray, start: int) -> None:
        """decode.c over x [B, D] (in place) at positions start..start+B-1."""
        c, b = self.config, x.shape[0]
        positions = np.arange(start, start + b, dtype=np.int64)
        cos, sin = self._rotary(positions)
        rows = np.zeros(b, np.int64)
        starts, ends = np.zeros(b, np.int64), positions + 1  # row i attends to positions 0..start+i
        step = decode_abi.Step(
            b, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, 1,
            self.cache.capacity, start + b, decode_abi.DT_F32, self.cache.bits, 0, self.threads,  # SiLU
            c.rms_norm_eps, c.residual_scale, 0.0, c.head_dim ** -0.5, cos.ctypes.data, sin.ctypes.data,
            rows.ctypes.data, positions.ctypes.data, starts.ctypes.data, ends.ctypes.data, None,
            self.kernels.attention_team, self.kernels.plan_scratch, *self.kernels.chunk_attention,
            int(self.cache.fp16))
        rc = self.kernels.decode.minicpm_decode_layers(ctypes.byref(step), self.weights.layers,
                                                       len(self.weights.layers), x.ctypes.data)
        if rc:
            raise (MemoryError if rc == -2 else RuntimeError)(f"native decode step failed ({rc})")

    def forward(self, ids: list[int], start: int) -> np.ndarray:
        """fp32 logits [vocab] after running `ids` at positions start.. (the cache keeps them)."""
        if not ids or not 0 <= start <= self.length:
            raise ValueError(f"cannot run {len(ids)} ids at position {start} of a cache of {self.length}")
        ids = [int(i) for i in ids]
        end = start + len(ids)
        if end > self.config.max_position_embeddings:
            raise ValueError(f"{end} positions exceed the context of {self.config.max_position_embeddings}")
        resume = self.cache.resumable(start, self.length)
        ids, start = self.tokens[resume:start] + ids, resume
        self.cache.reserve(end, start, self.weights.layers)
        del self.tokens[start:]
        for at in range(0, len(ids), CHUNK):  # the cache holds whole chunks, even if interrupted
            chunk = ids[at:at + CHUNK]
            x = self.embed(np.asarray(chunk, dtype=np.int64))
            self._layers(x, start + at)
            self.tokens += chunk
        return self.head(x[-1:])[0]

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final RMSNorm and the head over hidden states [M, D] -> fp32 logits [M, vocab]."""
        c = self.config
        norm = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(c.rms_norm_eps))
        h = np.ascontiguousarray(norm * self.weights.final_norm / np.float32(c.logit_scale), dtype=np.float32)
        return self.kernels.matmul(self.weights.head, h, self.threads)


def file_config(file: GGUFFile) -> MiniCPMConfig:
    """The file's config (CheckpointError for an architecture we do not read)."""
    arch = file.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{file.path}: GGUF architecture {arch!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in file.tensors}
    return config_from_metadata(file.metadata, tied="output.weight" not in names, source=str(file.path))


def default_threads() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
