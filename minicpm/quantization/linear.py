"""Weight-only quantized Linear: int8 per output channel or group, int4 group-wise.

A layer is made from integer codes plus scales (and zeros or offsets), whatever produced them:
round-to-nearest here (`from_float`), GGUF blocks repacked as stored (formats/gguf/repack.py),
GPTQ/AWQ checkpoints repacked at load (formats/published). Dequantization is

    int8:  w[n, k] = qweight[n, k] * scales[n]                             (group_size None)
           w[n, k] = qweight[n, k] * scales[n, k // G]                     (GGUF Q8_0, Q6_K)
    int4:  w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]      q in 0..15
           w[n, k] = q[n, k] * scales[n, k // G] + offsets[n, k // G]      (GGUF Q4_0/Q4_1/Q4_K)
in float32, each product and sum rounded once: for GGUF blocks exactly gguf-py's values.
A GPTQ act-order layer, whose groups are scattered over k (g_idx), holds its columns sorted by
group so that groups are contiguous, and `input_perm` gathers x's columns into that order:
y = x[..., input_perm] @ W[:, input_perm].T, the same product (the native kernel gathers as it
quantizes x; elsewhere an index_select).

On CPU the forward pass runs, in order of preference:
  native      our AVX-512 VNNI kernel (minicpm/kernels/qgemm.py): x quantized to int8 per block of
              32 inside the call, u8 x s8 dot products, the weight in a tiled layout of its own in
              huge-page memory. Decode (M=1) streams the weight from DRAM at ~25 GB/s, 2.5x
              PyTorch's int4 kernel; prefill (M=512) is ~2.5x PyTorch's int4 kernel and on par
              with bf16 F.linear (numbers: benchmarks/qgemv.py). x in fp32 or bf16, y in x's dtype.
              The int8 x costs ~0.5% relative error per output (llama.cpp's q8_0 does the same).
  packed      PyTorch's weight-packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
              where the native kernel is unavailable (MINICPM_NATIVE=0, no compiler, other CPU).
              They run with bf16 activations (x is cast around the call): their fp32 paths are
              reference loops, 5-20x slower than bf16 at batch 1 (e.g. int8 2304x2304: 8.1 ms fp32,
              0.39 ms bf16; fp32 F.linear: 1.9 ms). Scales are then held in bf16 too, as the kernels
              require. Int4 packing needs out_features % 16 == 0. Not used for the GGUF forms
              (offsets, int8 groups), which these kernels cannot represent exactly.
  dequantize  everywhere else (other devices, shapes the packed kernels refuse): plain codes,
              dequantized on the fly; slower, same numbers.
A layer holds one runtime copy of its weight, in the layout of its kernel.

The checkpoint form is portable, not the CPU-packed one (whose byte order is an internal detail
of PyTorch): see `portable_state`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpm.errors import MiniCPMError
from minicpm.kernels import qgemm as native

GROUP_SIZES = (32, 64, 128)
_INT4_PACK_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants out_features divisible by this
_INT4_PACK_GROUPS = (32, 64, 128, 256)  # and _weight_int4pack_mm_for_cpu these groups (GPTQ -1: one per row)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row RTN: (qweight int8 [N, K], scales fp32 [N])."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise RTN: (q uint8 [N, K] in 0..15, scales [N, K/G], zeros [N, K/G]) in fp32."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    # A float zero point puts the grid's ends exactly on the group's min and max. GPTQ/AWQ store
    # integer zeros, a special case the layer takes as well. (For SmolLM2's Q4_1 source, whose
    # blocks are such grids, integer zeros gave a 84% relative logit error at group 32; float: 1%.)
    zeros = -lo / scales
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes 0..15 -> uint8 [N, K/2]; even k in the low nibble, odd k in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _permutation(perm: torch.Tensor, k: int) -> torch.Tensor:
    """`perm` as int64, checked to be a permutation of 0..k-1: the native kernel gathers x's
    columns through it without bounds checks, so a damaged one would read past x."""
    perm = perm.long().contiguous()
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k, device=perm.device)):
        raise MiniCPMError(f"input_perm is not a permutation of 0..{k - 1} (shape {list(perm.shape)})")
    return perm


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


class FrozenWeightLinear(torch.autograd.Function):
    """x @ W^T for a quantized layer's frozen weight W, under autograd (LoRA/QLoRA training)
    without keeping W: F.linear would hold every layer's dequantized weight until the backward
    pass (MiniCPM-2B in bf16: 4.9 GB at any micro-batch), so the backward pass dequantizes it
    again, as QLoRA does. Under autocast the product runs in autocast's dtype, as F.linear's would:
    the same values and gradients, one more dequantization per layer and step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.layer, ctx.cast, ctx.dtype = layer, cast, x.dtype
        with torch.autocast(device, enabled=False):
            return F.linear(x.to(cast), layer.stored_weight().to(cast))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            weight = ctx.layer.stored_weight().to(ctx.cast)
            return grad.to(ctx.cast).mm(weight).to(ctx.dtype), None


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b, with W held as int8 or int4 codes."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, *, offsets: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, block_nibbles: bool = False,
                 input_perm: torch.Tensor | None = None):
        """int4 takes `zeros` or `offsets`; int8 with a group_size takes scales [N, K/G].
        `dtype`: the model's (what dequantize() and saving give), default the scales' dtype.
        `block_nibbles`: int4 qweight is uint8 [N, K/2] in GGUF's Q4_0/Q4_1 byte order
        (native.pack_int4_blocks), which the native layout takes without unpacking.
        `input_perm`: the columns are stored in this order of x's (act-order GPTQ)."""
        super().__init__()
        if input_perm is not None:
            input_perm = _permutation(input_perm, in_features)
        self.register_buffer("input_perm", input_perm, persistent=False)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.has_offsets = offsets is not None
        # Runtime tensors are non-persistent buffers: they move with .to(), and the checkpoint
        # form is written by _save_to_state_dict instead.
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = self._pick_kernel(qweight.device)
        self._plan = None  # the native kernel's arguments, made at first use
        self.dtype = dtype or scales.dtype  # of the float tensors it saves; the model's dtype
        second = "offsets" if self.has_offsets else "zeros"  # int4's per-group term, by its name
        if block_nibbles and self.kernel != "native":
            qweight, block_nibbles = native.block_nibbles_to_codes(qweight), False
        if self.kernel == "native":
            # scales/zeros in their own dtype when the kernel reads it, so that saving is exact
            meta = scales.dtype if scales.dtype in native.KINDS else torch.float32
            self.k_padded = native.padded_k(bits, in_features, group_size)
            if bits == 8:
                self.register_buffer("qweight", native.pack_int8(qweight, self.k_padded), persistent=False)
                per_row = scales.to(meta)[:, None] if group_size is None else scales.to(meta)
                packed = native.pack_meta(per_row)                                  # [T, K/G, 16]
                self.register_buffer("scales", packed.reshape(-1) if group_size is None else packed,
                                     persistent=False)                              # per row: [T*16]
            else:
                pack = native.pack_int4_blocks if block_nibbles else native.pack_int4
                self.register_buffer("qweight", pack(qweight), persistent=False)
                self.register_buffer("scales", native.pack_meta(scales.to(meta)), persistent=False)  # [T, K/G, 16]
                term = offsets if self.has_offsets else zeros
                self.register_buffer(second, native.pack_meta(term.to(meta)), persistent=False)
        elif self.exact_only:  # dequantized on the fly; codes and metadata as given
            self.register_buffer("qweight", qweight, persistent=False)        # int8 or uint8 [N, K]
            self.register_buffer("scales", scales, persistent=False)          # [N, K/G]
            if bits == 4:
                self.register_buffer(second, offsets if self.has_offsets else zeros, persistent=False)
        elif bits == 8:
            if self.packed and qweight.data_ptr() % 64:
                # The int8 kernel crashes (SIGSEGV) on weights that are not 64-byte aligned, as
                # tensors read from a safetensors file can be; a copy from PyTorch's allocator is.
                qweight = qweight.clone()
            self.register_buffer("qweight", qweight, persistent=False)        # int8 [N, K]
            self.register_buffer("scales", scales.to(self._kernel_dtype), persistent=False)  # [N]
        elif self.packed:
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                qweight.to(torch.int32), 1), persistent=False)               # PyTorch's CPU layout
            # The kernel computes (q - 8) * scale + zero: our zero point becomes (8 - zeros) * scale.
            # from scales already rounded to the kernel's dtype, so that a saved and reloaded layer
            # (whose scales are those rounded ones) packs to the very same bits
            s = scales.to(self._kernel_dtype).float()
            szeros = torch.stack((s, (8 - zeros.float()) * s), dim=-1)       # [N, K/G, 2]
            self.register_buffer("scales_and_zeros", szeros.transpose(0, 1).to(self._kernel_dtype).contiguous(),
                                 persistent=False)
            # Kept for saving: recovering zeros from the kernel's form is not exact in bf16.
            self.register_buffer("zeros", zeros, persistent=False)            # [N, K/G]
        else:
            self.register_buffer("qweight", qweight, persistent=False)        # uint8 [N, K], 0..15
            self.register_buffer("scales", scales, persistent=False)          # [N, K/G]
            self.register_buffer("zeros", zeros, persistent=False)            # [N, K/G]

    def _apply(self, fn, *args, **kwargs):
        self._plan = None  # .to() and friends move or convert the tensors the plan points at
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan"] = None  # raw pointers: a copy (deepcopy, pickle) makes its own plan
        return state

    @property
    def exact_only(self) -> bool:
        """A GGUF form (offsets, int8 groups): PyTorch's packed kernels cannot hold it exactly."""
        return self.has_offsets or (self.bits == 8 and self.group_size is not None)

    @property
    def _term(self) -> torch.Tensor | None:
        """int4's per-group zero points or offsets, in the runtime layout."""
        return None if self.bits == 8 else (self.offsets if self.has_offsets else self.zeros)

    @property
    def packed(self) -> bool:
        """Whether the weight is in PyTorch's packed layout (the native kernel has its own)."""
        return self.kernel == "packed"

    def _pick_kernel(self, device: torch.device) -> str:
        """native > packed (PyTorch's CPU kernels) > dequantize (+ F.linear)."""
        if device.type != "cpu":
            return "dequantize"  # the CUDA int4 kernel wants another layout; not wired up yet
        if self.exact_only:
            native_ok = self.in_features % 32 == 0 and (self.bits == 4 or self.group_size % 16 == 0)
            return "native" if native_ok and native.available() else "dequantize"
        if (self.bits == 8 or self.in_features % 32 == 0) and native.available():
            return "native"
        if self.bits == 8:
            # PyTorch 2.13's _weight_int8pack_mm segfaults on an AVX2-only EPYC when in_features
            # is not a multiple of 8 and x has more than one row (K = 33, 36, 100, 239 crashed)
            ok = _has_op("_weight_int8pack_mm") and self.in_features % 8 == 0
            return "packed" if ok else "dequantize"
        ok = (_has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")
              and self.out_features % _INT4_PACK_ROWS == 0 and self.group_size in _INT4_PACK_GROUPS)
        return "packed" if ok else "dequantize"

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int | None, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32, offsets: torch.Tensor | None = None,
                       input_perm: torch.Tensor | None = None) -> QuantizedLinear:
        """A layer from codes in the checkpoint layout (int4: nibble-packed uint8 [N, K/2])."""
        if bits == 4:
            qweight = unpack_nibbles(qweight)
        out_features, in_features = qweight.shape
        zeros = None if zeros is None else zeros.to(dtype)
        offsets = None if offsets is None else offsets.to(dtype)
        return cls(in_features, out_features, bits, group_size, qweight, scales.to(dtype), zeros,
                   None if bias is None else bias.to(dtype), offsets=offsets, input_perm=input_perm)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                   name: str = "layer", dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Round-to-nearest quantization of an nn.Linear (computed in fp32); scales, zeros and bias
        in `dtype`, which becomes the compute dtype (default: the Linear's own)."""
        weight, dtype = linear.weight.detach(), dtype or linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        if bits == 8:
            q, scales = quantize_int8(weight)
            return cls(weight.shape[1], weight.shape[0], 8, None, q, scales.to(dtype), None, bias)
        if bits != 4:
            raise MiniCPMError(f"bits must be 4 or 8, got {bits}")
        if weight.shape[1] % group_size:
            raise MiniCPMError(f"{name}: in_features {weight.shape[1]} is not divisible by group size "
                               f"{group_size}")
        q, scales, zeros = quantize_int4(weight, group_size)
        return cls(weight.shape[1], weight.shape[0], 4, group_size, q, scales.to(dtype), zeros.to(dtype), bias)

    @property
    def _kernel_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.packed else self.dtype  # native: x's own dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._kernel_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if (plan is not None and x.is_cpu and (x.dtype is torch.bfloat16 or x.dtype is torch.float32)
                and x.shape[-1] == self.in_features and x.is_contiguous() and not x.requires_grad):
            return native.run(plan, x)  # the decode path: as little Python as possible
        return self._forward(x)

    def _native_plan(self) -> native.Plan:
        """The native kernel's arguments for this layer, made once (until .to() moves the tensors)."""
        if self._plan is None:
            bias = None if self.bias is None else self.bias.detach()
            if bias is not None and bias.dtype not in native.KINDS:
                bias = bias.float()  # a copy the plan keeps: the kernel reads fp32/bf16/fp16
            self._plan = native.plan(self.bits, self.qweight, self.scales, self._term,
                                     self.out_features, self.in_features, self.k_padded, self.group_size,
                                     None if bias is None else bias.contiguous(), self.has_offsets,
                                     perm=self.input_perm)  # act-order: the kernel gathers x itself
        return self._plan

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # autograd through x (the kernel has no backward) goes the dequantize way, as elsewhere
        if self.kernel == "native" and self.qweight.is_cpu and not (x.requires_grad and torch.is_grad_enabled()):
            if shape[-1] != self.in_features or not x.is_cpu:  # the C side would read out of bounds
                raise ValueError(f"{self}: got input of shape {tuple(shape)} on {x.device}")
            x2 = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
            return native.run(self._native_plan(), x2.contiguous()).to(x.dtype)
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)  # in the stored column order
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)  # the kernels want 2-D x in the scales' dtype
        if self.kernel != "packed" and x2.requires_grad and torch.is_grad_enabled():
            y = FrozenWeightLinear.apply(x2, self)
        elif self.kernel != "packed":
            y = F.linear(x2, self.stored_weight().to(x2.dtype))
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size,
                                                           self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def codes(self) -> torch.Tensor:
        """The integer codes, [N, K] (int8, or uint8 0..15 for int4), whatever the runtime layout."""
        if self.kernel == "native":
            if self.bits == 8:
                return native.unpack_int8(self.qweight, self.out_features, self.in_features, self.k_padded)
            return native.unpack_int4(self.qweight, self.out_features, self.in_features)
        if self.bits == 8 or not self.packed:
            return self.qweight
        # The packed byte order is private to PyTorch, so read the codes back through the kernel
        # itself: with scale 1 and zero 8 it returns q exactly (0..15 are exact in bf16, whose
        # kernel path is ~20x faster than fp32's: saving SmolLM2 took 175 s in fp32).
        ones = torch.ones_like(self.scales_and_zeros, dtype=torch.bfloat16)
        ones[..., 1] = 8
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, ones)
        return q.t().round().to(torch.uint8)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, zeros or offsets) in the checkpoint layout (int8 per row: scales [N])."""
        if self.kernel == "native":
            if self.bits == 8 and self.group_size is None:
                return self.scales[:self.out_features].to(self.dtype), None
            scales = native.unpack_meta(self.scales, self.out_features).to(self.dtype)
            term = self._term
            return scales, None if term is None else native.unpack_meta(term, self.out_features).to(self.dtype)
        if self.bits == 8:
            return self.scales.to(self.dtype), None
        if not self.packed:
            return self.scales.to(self.dtype), self._term.to(self.dtype)
        return self.scales_and_zeros[..., 0].t().to(self.dtype).contiguous(), self.zeros

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the dequantized weight, [*index.shape, K] (embedding lookups), read from
        the codes without dequantizing the rest: the same values as dequantize()[index]."""
        if self.packed and self.bits == 4:
            return F.embedding(index, self.dequantize())  # PyTorch's private layout: correct, not fast
        if self.input_perm is not None:  # a permuted head: correct, not fast (no such GPTQ head seen)
            return F.embedding(index, self.dequantize())
        flat = index.reshape(-1)
        if self.kernel != "native":
            q, scales, term = self.qweight[flat], self.scales[flat], self._term
            term = None if term is None else term[flat]
        elif self.bits == 8:
            q = native.int8_rows(self.qweight, self.out_features, self.in_features, self.k_padded, flat)
            scales = self.scales[flat] if self.group_size is None else native.meta_rows(self.scales, flat)
            term = None
        else:
            q = native.int4_rows(self.qweight, self.out_features, self.in_features, flat)
            scales, term = native.meta_rows(self.scales, flat), native.meta_rows(self._term, flat)
        return self._dequantize(q, scales, term, self.dtype).reshape(*index.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as floats, [N, K] in the layer's dtype and x's column order (tests,
        dequantize_model)."""
        w = self.stored_weight()
        if self.input_perm is None:
            return w
        unpermuted = torch.empty_like(w)
        unpermuted[:, self.input_perm] = w
        return unpermuted

    def stored_weight(self) -> torch.Tensor:
        """The weight as floats in the stored column order (what the kernels multiply)."""
        scales, term = self.scales_zeros()
        return self._dequantize(self.codes(), scales, term, scales.dtype)

    def _dequantize(self, q: torch.Tensor, scales: torch.Tensor, term: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
        """Codes [R, K] with their rows' scales ([R] or [R, K/G]) and zeros/offsets -> floats in
        `dtype`, computed in fp32 (each product and sum rounded once, as gguf-py does)."""
        n, k = q.shape
        s = scales.float().reshape(n, -1)[..., None]           # one group of K per row if per row
        g = q.float().reshape(n, s.shape[1], -1)
        if term is None:
            w = g * s
        elif self.has_offsets:
            w = g * s + term.float()[..., None]
        else:
            w = (g - term.float()[..., None]) * s
        return w.reshape(n, k).to(dtype)

    def portable_state(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: qweight (int8 [N, K] | uint8 [N, K/2] nibbles), scales ([N] or
        [N, K/G]), zeros or offsets (int4), input_perm (int32 [K], act-order), bias."""
        scales, term = self.scales_zeros()
        q = self.codes()
        state = {"qweight": q if self.bits == 8 else pack_nibbles(q), "scales": scales}
        if term is not None:
            state["offsets" if self.has_offsets else "zeros"] = term
        if self.input_perm is not None:
            state["input_perm"] = self.input_perm.to(torch.int32)
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in self.portable_state().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        form = (", offsets" if self.has_offsets else "") + (", input permuted" if self.input_perm is not None else "")
        return f"{self.in_features}, {self.out_features}, bits={self.bits}{group}{form}, kernel={self.kernel}"

    def decode_spec(self) -> dict | None:
        """What the native decode step needs (minicpm.kernels.decode): the qgemm plan; None where
        the native kernel does not serve."""
        if self.kernel != "native" or not self.qweight.is_cpu:
            return None
        return {"kind": "qgemm", "plan": self._native_plan()}


def share_equal_permutations(model: nn.Module) -> None:
    """Give act-order layers with equal permutations one tensor. GPTQ orders the columns of q/k/v (and of gate/up) alike, for they read the same input, and
    the native kernels quantize a shared input once only when the plans point at one permutation
    (qgemm.c `same_quantized_x`)."""
    seen: dict[bytes, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.input_perm is not None:
            perm = seen.setdefault(module.input_perm.cpu().numpy().tobytes(), module.input_perm)
            if perm is not module.input_perm:
                module.input_perm, module._plan = perm, None
