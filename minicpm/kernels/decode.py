"""The native decode step (decode.c): every decoder layer's per-token work in one call.

`NativeDecoder(model)` describes a model's layers once as C structs: norm weights, and for each
projection the kernel that serves it, taken from the module's `decode_spec()` (Linear: its
weight streamed by linear_bf16.c/linear_f32.c; QuantizedLinear: its qgemm plan). decode.c runs
the step as one OpenMP region and calls each kernel's `_team` entry point (its thread's share). Where any
projection has no spec, the dtype is not fp32/bf16, or a kernel is not built here, the decoder
is not `ready` and the model runs its Python layers. `run` then decodes one token for B rows
of hidden state against a KV cache (in place of the layer loop); embedding, final norm and head
stay in Python. The model's Python layers are the reference: tests compare the two.
"""

from __future__ import annotations

import ctypes

import torch

from minicpm.kernels import attention, linear, qgemm
from minicpm.kernels.decode_abi import MAX_TOP_K, P_QGEMM, P_STREAM, Layer, Proj, Step, declare
from minicpm.kernels.libraries import DECODE as KERNEL

DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # decode.c's DT_*: also qgemm's and attention's codes
KV_BITS = {torch.int8: 8, torch.uint8: 4}  # decode.c's kv_bits of a coded cache (else 0)


def setup(lib: ctypes.CDLL) -> None:
    declare(lib)


def _address(lib: ctypes.CDLL | None, name: str) -> int | None:
    return None if lib is None else ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream_ok(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return t is None or (t.dtype is dtype and t.is_cpu and t.is_contiguous())


def _projection(module, dtype: torch.dtype, keep: list) -> Proj | None:
    """The C description of one projection module, or None where no native kernel serves it."""
    spec = getattr(module, "decode_spec", None)
    spec = spec() if callable(spec) else None
    if spec is None:
        return None
    if spec["kind"] == "qgemm":
        fn, plan = _address(qgemm.library(), "qgemm_plan_team"), spec["plan"]
        keep.append(plan)
        return None if fn is None else Proj(fn, ctypes.addressof(plan), None, None, plan.N, plan.K, P_QGEMM)
    weight, bias = spec["weight"], spec["bias"]
    if not (_stream_ok(weight, dtype) and _stream_ok(bias, dtype)):
        return None
    kernel, name = ((linear.KERNEL, "minicpm_linear_bf16_team") if dtype is torch.bfloat16
                    else (linear.KERNEL_F32, "minicpm_linear_f32_team"))
    fn = _address(kernel.library(), name)
    keep.append((weight, bias))
    return None if fn is None else Proj(fn, None, weight.data_ptr(), _pointer(bias), weight.shape[0],
                                        weight.shape[1], P_STREAM)


class NativeDecoder:
    """A model's decoder layers as decode.c structs, built once (`ready` False where it cannot serve)."""

    def __init__(self, model):
        config = model.config
        self.config, self.dtype = config, model.dtype
        self.modules: list[tuple[dict, str, object]] = []  # (parent._modules, name, module) described
        self.keep: list = []  # tensors and plans the structs point into
        self.stores_at: tuple[int, ...] = ()  # addresses of the cache stores the layer structs point at
        self.kv_bits = 0  # of those stores: 0 (the model dtype), 8 or 4
        self.act = 0 if config.hidden_act == "silu" else 1
        self.sparse = getattr(model, "sparse_mlp", True)
        threshold = config.hidden_act_param if config.hidden_act == "fatrelu" else 0.0
        self.threshold = torch.tensor(threshold, dtype=self.dtype).item()  # PyTorch compares in the dtype
        self.lib = KERNEL.library()
        self.attention = _address(attention.KERNEL.library(), "minicpm_decode_attention_team")
        self.qscratch = _address(qgemm.library(), "qgemm_plan_scratch")
        self.layers = self._layers(model) if self._servable(model) else None
        self.ready = self.layers is not None

    def _servable(self, model) -> bool:
        c = self.config
        return (self.lib is not None and self.attention is not None and self.dtype in DTYPES
                and model.device.type == "cpu" and c.head_dim % 16 == 0 and c.head_dim <= 256
                and (c.num_experts_per_tok or 0) <= MAX_TOP_K)

    def _describe(self, parent, name: str) -> Proj | None:
        module = parent._modules[name]
        self.modules.append((parent._modules, name, module))
        return _projection(module, self.dtype, self.keep)

    def _norm(self, norm) -> int | None:
        w = norm.weight
        self.keep.append(w)
        return w.data_ptr() if _stream_ok(w, self.dtype) else None

    def _layers(self, model):
        layers = (Layer * len(model.model.layers))()
        for struct, layer in zip(layers, model.model.layers):
            if not self._layer(struct, layer):
                return None
        return layers

    def _layer(self, struct: Layer, layer) -> bool:
        attn, mlp = layer.self_attn, layer.mlp
        struct.norm1, struct.norm2 = self._norm(layer.input_layernorm), self._norm(layer.post_attention_layernorm)
        parts = [(name, attn, name + "_proj") for name in ("q", "k", "v", "o")]
        experts = getattr(mlp, "experts", None)
        if experts is None:
            rows = self._down_rows(mlp)
            parts += [(name, mlp, name + "_proj") for name in (("gate", "up") if rows else ("gate", "up", "down"))]
            struct.down_rows, struct.all_neurons = rows, not self.sparse
        else:
            parts.append(("router", mlp, "gate"))
            table = (Proj * (3 * len(experts)))()
            self.keep.append(table)
            for i, expert in enumerate(experts):
                for j, name in enumerate(("w1", "w3", "w2")):
                    proj = self._describe(expert, name)
                    if proj is None:
                        return False
                    table[3 * i + j] = proj
            struct.experts, struct.top_k = ctypes.addressof(table), mlp.top_k
        for field, parent, name in parts:
            proj = self._describe(parent, name)
            if proj is None:
                return False
            setattr(struct, field, proj)
        return bool(struct.norm1 and struct.norm2)

    def _down_rows(self, mlp) -> int | None:
        """FATReLU layers (MiniCPM-S) whose up and down are streamed (fp32/bf16, no bias): the address
        of down's weight as [intermediate, hidden] rows, one per neuron (MLP stores it so), which
        decode.c reads for the active neurons only; None: the layer runs dense products."""
        if self.act != 1:  # SiLU: nothing is zero
            return None
        up, down = mlp.up_proj, mlp.down_proj
        specs = [getattr(m, "decode_spec", lambda: None)() for m in (up, down)]
        if any(spec is None or spec["kind"] != "stream" or spec["bias"] is not None for spec in specs):
            return None
        w = down.weight
        if w.dtype is not self.dtype or w.device.type != "cpu" or not w.t().is_contiguous():
            return None
        self.keep.append(w)
        return w.data_ptr()  # the view's first element is the rows' first

    def describes(self, model) -> bool:
        """Whether every projection module is still the one described (not swapped since), and the
        sparse MLP choice is still the model's."""
        return (all(modules[name] is module for modules, name, module in self.modules)
                and self.sparse == getattr(model, "sparse_mlp", True))

    def _point_at(self, cache) -> bool:
        """Point the layer structs at `cache`'s stores; False where decode.c cannot read them.
        (Addresses, not the tensors, are remembered: a finished cache is not kept alive.)"""
        coded = hasattr(cache, "key_scales")
        none = [None] * len(cache.keys)
        kscales, vscales = (cache.key_scales, cache.value_scales) if coded else (none, none)
        tails = getattr(cache, "key_tail", none)  # int4: each row's newest block of keys, fp32
        at = tuple(t.data_ptr() for t in (*cache.keys, *cache.values, *kscales, *vscales, *tails) if t is not None)
        if at == self.stores_at:
            return True
        want = cache.CODES if coded else self.dtype
        stores = list(zip(cache.keys, cache.values, kscales, vscales))
        if not all(k.dtype is want and v.dtype is want and k.is_contiguous() and v.is_contiguous()
                   and (ks is None or (ks.dtype is torch.float32 and ks.is_contiguous() and vs.is_contiguous()))
                   for k, v, ks, vs in stores):
            return False
        if not all(t is None or (t.dtype is torch.float32 and t.is_contiguous()) for t in tails):
            return False
        for struct, (k, v, ks, vs), tail in zip(self.layers, stores, tails):
            struct.kstore, struct.vstore, struct.kscale, struct.vscale, struct.ktail = map(_pointer, (k, v, ks, vs, tail))
        self.stores_at, self.kv_bits = at, KV_BITS.get(want, 0)
        return True

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, rows: torch.Tensor,
            positions: torch.Tensor, starts: torch.Tensor | None, ends: torch.Tensor | None, length: int,
            mask: torch.Tensor | None) -> torch.Tensor | None:
        """x [B, 1, D] after every layer, writing row b's k/v at (rows[b], positions[b]) and
        attending over [starts[b], ends[b]) (None: [0, length)) of that cache row; mask bool,
        broadcastable to [B, length] (True = attend). None (nothing written) where it cannot serve."""
        b, _, d = x.shape
        if (x.dtype is not self.dtype or b > linear.MAX_ROWS or not self._point_at(cache)
                or not all(t is None or (t.dtype is torch.int64 and t.is_contiguous()) for t in (rows, positions,
                                                                                               starts, ends))):
            return None
        c, shape = self.config, cache.keys[0].shape
        # one table row per batch row: a batch in lockstep without a mask shares one position
        cos, sin = (t.reshape(-1, t.shape[-1]).expand(b, -1).float().contiguous() for t in (cos, sin))
        if cos.shape[-1] != c.head_dim:
            return None
        out = x.reshape(b, d).clone()
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)[:, :length].expand(b, length).to(torch.uint8).contiguous()
        step = Step(b, d, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, shape[0],
                    shape[2], length, DTYPES[self.dtype], self.kv_bits, self.act, torch.get_num_threads(),
                    c.rms_norm_eps, c.residual_scale, self.threshold, c.head_dim ** -0.5, cos.data_ptr(),
                    sin.data_ptr(), rows.data_ptr(), positions.data_ptr(), _pointer(starts), _pointer(ends),
                    _pointer(mask), self.attention, self.qscratch)
        rc = self.lib.minicpm_decode_layers(ctypes.byref(step), self.layers, len(self.layers), out.data_ptr())
        if rc:
            raise (MemoryError if rc == -2 else RuntimeError)(f"native decode step failed ({rc})")
        return out.view(b, 1, d)
