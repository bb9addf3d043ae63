"""The native CPU kernels in minicpm/kernels against PyTorch, and their fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minicpm.kernels.attention import (
    LeftPadding,
    attention,
    causal_attention,
    causal_mask,
    decode_attention,
    full_attention,
    trainable_causal_attention,
)
from minicpm.kernels.linear import (
    KERNEL,
    KERNEL_F32,
    MAX_ROWS,
    linear_bf16,
    linear_f32,
    linear_gemm,
    linear_widened,
)


@pytest.mark.parametrize("n,k", [(7, 33), (64, 64), (100, 1000), (1536, 3840)])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_equals_f_linear(n, k, rows, bias):
    assert KERNEL.library() is not None, KERNEL.reason
    g = torch.Generator().manual_seed(n + k + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    got = linear_bf16(x, w, b)
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    # fp32 sums like F.linear's, in another order; the output is rounded to bf16 once
    torch.testing.assert_close(got.float(), exact, rtol=1 / 128, atol=1e-2)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)


def test_bf16_linear_keeps_leading_dims_and_declines_what_it_does_not_serve():
    w = torch.randn(16, 32).bfloat16()
    assert linear_bf16(torch.randn(2, 1, 32).bfloat16(), w, None).shape == (2, 1, 16)
    assert linear_bf16(torch.randn(MAX_ROWS + 1, 32).bfloat16(), w, None) is None  # prefill: oneDNN
    assert linear_bf16(torch.randn(1, 32), w, None) is None                       # fp32 x
    assert linear_bf16(torch.randn(1, 32).bfloat16(), w.t().contiguous().t(), None) is None  # strided W
    trained = torch.nn.Parameter(w.clone())
    assert linear_bf16(torch.randn(1, 32).bfloat16(), trained, None) is None       # autograd


@pytest.mark.parametrize("n,k", [(7, 33), (37, 70), (1536, 960)])
@pytest.mark.parametrize("bias", [False, True])
def test_f32_linear_rows_do_not_depend_on_the_row_count(n, k, bias):
    """MKL's F.linear sums a row differently for other row counts; this kernel does not."""
    assert KERNEL_F32.library() is not None, KERNEL_F32.reason
    g = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(MAX_ROWS, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    full = linear_f32(x, w, b)
    torch.testing.assert_close(full, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for rows in (1, 2, 3, 5, 8):
        assert torch.equal(linear_f32(x[:rows], w, b), full[:rows])
    assert torch.equal(torch.cat([linear_f32(x[i:i + 1], w, b) for i in range(MAX_ROWS)]), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_is_f_linear_then_exact_gelu(dtype, gelu):
    """The vision tower's products: F.linear (and the erf GELU, not the tanh one, which differs
    by up to 5e-4 here) with fp32 sums in another order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 64, generator=g)
    w, b = torch.randn(96, 64, generator=g) / 8, torch.randn(96, generator=g)
    got = linear_gemm(x.to(dtype), w.to(dtype), b.to(dtype), gelu=gelu)
    exact = F.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())
    exact = F.gelu(exact) if gelu else exact
    assert got.dtype == dtype and got.shape == (2, 50, 96)
    tolerance = 2e-6 if dtype == torch.float32 else 2e-2  # bf16: the output rounded once
    assert (got.double() - exact).abs().max() < tolerance
    expanded = x[:1, :1].expand(2, 50, 64).to(dtype)  # not contiguous: the resampler's queries
    assert torch.equal(linear_gemm(expanded, w.to(dtype)), linear_gemm(expanded.contiguous(), w.to(dtype)))


def _within_one_bf16_step(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """got (bf16) is exact rounded to bf16, or one of its neighbours (fp32 sums in another order
    can land on the other side of a rounding boundary); plus fp32's own error where the exact
    value is tiny (GELU of a negative input cancels in 1 + erf)."""
    return bool(((got.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 2.0 ** -20).all())


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_widened_linear_is_a_bf16_gemm_with_fp32_sums(monkeypatch, gelu, bias):
    """bf16 products as fp32 GEMMs (CPUs without bf16 arithmetic): F.linear of the bf16 values,
    then GELU, rounded to bf16 once, over blocks of the weight's rows (here 3 blocks and a short
    fourth) that change no value."""
    from minicpm.kernels import linear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 40, 96, generator=g).bfloat16()
    w = (torch.randn(200, 96, generator=g) / 10).bfloat16()
    b = torch.randn(200, generator=g).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    exact = F.gelu(exact) if gelu else exact
    whole = linear_widened(x, w, b, gelu=gelu)
    assert whole.dtype is torch.bfloat16 and whole.shape == (3, 40, 200)
    assert _within_one_bf16_step(whole, exact)
    monkeypatch.setattr(linear, "WIDEN_BLOCK", 64 * 96)  # blocks of 64 weight rows
    blocked = linear_widened(x, w, b, gelu=gelu)
    assert _within_one_bf16_step(blocked, exact)
    with pytest.raises(RuntimeError, match="96 features"):
        linear_widened(x, w[:, :95], b)


def test_bf16_products_widen_only_without_bf16_arithmetic(monkeypatch):
    """Where the CPU has no bf16 arithmetic, the decoder's prefill products and the vision
    tower's run widened; decode-sized ones keep the weight-stream kernel, and a product that
    autograd must see keeps F.linear."""
    from minicpm.kernels import linear
    from minicpm.model import Linear

    layer = Linear(64, 48, bias=True).bfloat16()
    x = torch.randn(2, 30, 64).bfloat16()
    widened = []
    real = linear.linear_widened
    monkeypatch.setattr(linear, "linear_widened", lambda *a, **k: widened.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(linear, "bf16_is_native", lambda: True)
    with torch.no_grad():
        layer(x), linear_gemm(x, layer.weight, layer.bias)
    assert widened == []
    monkeypatch.setattr(linear, "bf16_is_native", lambda: False)
    with torch.no_grad():
        prefill = layer(x)
        gelu = linear_gemm(x, layer.weight, layer.bias, gelu=True)
        decode = layer(x[:, :1])
    assert widened == [x.shape, x.shape]  # not the one-row product
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert _within_one_bf16_step(prefill, exact) and _within_one_bf16_step(gelu, F.gelu(exact))
    with torch.no_grad():
        assert torch.equal(decode, linear_bf16(x[:, :1], layer.weight, layer.bias))
    trained = Linear(64, 48).bfloat16()
    trained(x).float().sum().backward()  # autograd: F.linear
    assert trained.weight.grad is not None and len(widened) == 2


def test_gemm_choices_read_the_cpu_flags(monkeypatch):
    """bf16 widened only without bf16 arithmetic; oneDNN's GEMM only with AVX-512 (MKL's fp32
    is the faster on AVX2); other architectures left to PyTorch."""
    from minicpm.kernels import linear

    choices = (linear.bf16_is_native, linear.onednn_is_faster)
    cases = (({"avx2", "fma"}, (False, False)), ({"avx512f", "avx512_bf16"}, (True, True)),
             ({"avx512f", "avx512_vnni"}, (False, True)), ({"avx2", "amx_bf16"}, (True, False)))
    monkeypatch.setattr(linear, "is_x86", lambda: True)
    for flags, expected in cases:
        monkeypatch.setattr(linear, "cpu_flags", lambda flags=flags: flags)
        for choice in choices:
            choice.cache_clear()
        assert tuple(choice() for choice in choices) == expected, flags
    monkeypatch.setattr(linear, "is_x86", lambda: False)
    for choice in choices:
        choice.cache_clear()
        assert choice() is True
    monkeypatch.undo()
    for choice in choices:
        choice.cache_clear()


def test_onednn_linear_falls_back_where_it_does_not_serve():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(linear_gemm(x, w, gelu=True), F.gelu(F.linear(x, w)))  # float64: F.linear
    trained = torch.nn.Parameter(torch.randn(3, 8))
    y = linear_gemm(torch.randn(4, 8), trained)
    y.sum().backward()  # autograd: F.linear, so gradients flow
    assert trained.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bad_input_to_the_onednn_linear_raises_and_disables_nothing(dtype):
    from minicpm.kernels import linear

    before = set(linear._ONEDNN_REFUSED)
    with pytest.raises(RuntimeError):
        linear_gemm(torch.randn(4, 8, dtype=dtype), torch.randn(3, 5, dtype=dtype))
    assert linear._ONEDNN_REFUSED == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, heads, kv, s, length, d", [
    (1, 4, 2, 5, 9, 32),       # a chunk after cached positions, GQA
    (2, 6, 3, 70, 70, 64),     # a fresh prompt: query tiles of 64 and a ragged one
    (1, 3, 1, 33, 100, 128),   # all heads on one kv head, head_dim 128
    (1, 2, 2, 1, 17, 16),      # one query
    (1, 4, 4, 130, 131, 64),   # past = 1: every tile's diagonal off by one
])
def test_causal_attention_equals_sdpa_with_the_queries_last(dtype, b, heads, kv, s, length, d):
    g = torch.Generator().manual_seed(s + length)
    q = torch.randn(b, s, heads, d, generator=g).to(dtype).transpose(1, 2)  # the model's strides
    k, v = (torch.randn(b, kv, length, d, generator=g).to(dtype) for _ in range(2))
    got = causal_attention(q, k, v)
    assert got is not None and got.dtype == torch.float32 and got.shape == (b, heads, s, d)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=causal_mask(s, length),
                                          enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    # a cache's leading part, as cache.read gives it (strided in positions)
    store = torch.randn(b, kv, length + 7, d, generator=g).to(dtype)
    got = causal_attention(q, store[:, :, :length], store[:, :, :length])
    want = F.scaled_dot_product_attention(q.float(), store[:, :, :length].float(), store[:, :, :length].float(),
                                          attn_mask=causal_mask(s, length), enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, heads, n, d", [
    (1, 16, 70, 72),    # SigLIP's head_dim, zero-padded to 80 for the kernel; a ragged query tile
    (2, 3, 33, 64),     # a ragged key tile
    (1, 2, 1, 16),      # one patch
    (1, 4, 130, 24),
])
def test_full_attention_equals_sdpa_without_a_mask(dtype, b, heads, n, d, monkeypatch):
    import minicpm.kernels.attention as kernels

    g = torch.Generator().manual_seed(n + d)
    # as the vision encoder makes them: views of one [B, N, 3, heads, D] projection
    qkv = torch.randn(b, n, 3, heads, d, generator=g).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert kernels.KERNEL.library() is not None  # built and self-checked (against SDPA) before the patch
    with monkeypatch.context() as patch:  # the kernel answers: SDPA is not reached
        patch.setattr(kernels, "avx512_kernels", lambda: True)  # (the AVX2 build here prefers SDPA)
        patch.setattr(kernels.F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("fell back to SDPA"))
        got = full_attention(q, k, v)
    assert got.dtype == dtype and got.shape == (b, heads, n, d)
    # fp32 sums either way; a bf16 result is the fp32 one rounded once (one bf16 step: 2^-8 relative)
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(got.float(), want, **tol)
    # autograd: SDPA, which has a backward
    q.requires_grad_()
    out = full_attention(q, k, v)
    out.float().sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, heads, kv, s, d", [
    (2, 9, 3, 70, 64),  # SmolLM2's heads: GQA, a ragged key tile and row block; two sequences
    (1, 4, 4, 33, 128),  # one past a key tile, head_dim 128
    (1, 2, 1, 2, 16),    # two positions
    (1, 3, 1, 130, 32),
])
def test_trainable_causal_attention_has_sdpas_values_and_gradients(dtype, b, heads, kv, s, d, monkeypatch):
    """The native forward and gradient kernels (training, one sequence) against float64 SDPA:
    within what fp32 sums give, and for bf16 no further off than PyTorch's own bf16 kernels."""
    import minicpm.kernels.attention as kernels

    g = torch.Generator().manual_seed(s + d)
    q = torch.randn(b, s, heads, d, generator=g).to(dtype).transpose(1, 2)  # the model's strides
    k, v = (torch.randn(b, s, kv, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    dout = torch.randn(b, heads, s, d, generator=g).to(dtype)

    def run(attend, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        out.backward(cast(dout))
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    sdpa = lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True)  # noqa: E731
    want = run(sdpa, lambda t: t.double())
    theirs = run(sdpa, lambda t: t)
    assert kernels.KERNEL.library() is not None  # built and self-checked (gradients included) before the patch
    with monkeypatch.context() as patch:  # the kernels answer on either ISA: SDPA is not reached
        patch.setattr(kernels, "avx512_kernels", lambda: True)
        patch.setattr(kernels.F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("fell back to SDPA"))
        ours = run(lambda *t: attention(*t, None), lambda t: t)
    for name, a, b, ref in zip(["out", "dq", "dk", "dv"], ours, theirs, want):
        scale = float(ref.norm())
        err, their_err = float((a - ref).norm()) / scale, float((b - ref).norm()) / scale
        assert err <= (1e-5 if dtype == torch.float32 else 2 * their_err + 1e-3), (name, err, their_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_batch_without_padding_attends_as_plain_causal(dtype):
    """A micro-batch whose rows are all full has an all-ones mask, which the model hands over as
    left padding of 0: under autograd that is plain causal attention (values and gradients bitwise
    those of mask None, the native gradients where they serve), not a dense mask's S x S."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 40, 4, 32, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(2, 40, 2, 32, generator=g).to(dtype).transpose(1, 2) for _ in range(2))

    def run(mask):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, mask)
        out.float().square().sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    for got, want in zip(run(LeftPadding((0, 0))), run(None)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["torch.inference_mode()", "torch.no_grad()"])
def test_the_attention_library_loads_first_under_any_grad_mode(mode):
    """Its self-check runs autograd; a server's first use is under inference_mode."""
    code = ("import torch\nfrom minicpm.kernels.attention import KERNEL\n"
            f"with {mode}:\n    assert KERNEL.library() is not None\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_trainable_causal_attention_declines_what_it_does_not_serve(monkeypatch):
    import minicpm.kernels.attention as kernels

    monkeypatch.setattr(kernels, "avx512_kernels", lambda: True)
    q, k = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 6, 32)
    assert trainable_causal_attention(q, k, k) is None                       # queries after cached keys
    assert trainable_causal_attention(q.half(), q.half(), q.half()) is None
    assert trainable_causal_attention(q[..., :24], q[..., :24], q[..., :24]) is None
    assert trainable_causal_attention(q, q, q) is not None                   # what it serves
    monkeypatch.setattr(kernels, "avx512_kernels", lambda: False)  # the AVX2 path: SDPA's is the faster
    assert trainable_causal_attention(q, q, q) is None


def test_full_attention_takes_sdpa_on_the_avx2_path(monkeypatch):
    """Where the kernels run their AVX2 code, PyTorch's SDPA is the faster full attention."""
    import minicpm.kernels.attention as kernels
    from minicpm.kernels import build

    q = torch.randn(1, 2, 20, 72)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    monkeypatch.setenv("MINICPM_NATIVE_ISA", "avx2")
    assert not build.avx512_kernels()
    torch.testing.assert_close(full_attention(q, q, q), sdpa(q, q, q))
    assert calls == [1]


def test_full_attention_with_grouped_kv_heads():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 40, 32, generator=g)
    k, v = (torch.randn(1, 2, 40, 32, generator=g) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(full_attention(q, k, v), want, rtol=1e-5, atol=2e-5)
    q.requires_grad_()  # SDPA's path, grouped too
    torch.testing.assert_close(full_attention(q, k, v).detach(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("past", [0, 3])
def test_left_padded_rows_attend_as_alone(dtype, past):
    g = torch.Generator().manual_seed(past)
    starts, s, heads, kv, d = (0, 5, 9), 12, 4, 2, 32
    length = past + s
    q = torch.randn(3, heads, s, d, generator=g).to(dtype)
    k, v = (torch.randn(3, kv, length, d, generator=g).to(dtype) for _ in range(2))
    padding = LeftPadding(starts)
    got = attention(q, k, v, padding)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=padding.dense(s, length),
                                          enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)  # padding queries included
    for row, start in enumerate(starts):  # a real row: bitwise what it gives alone
        first = max(0, start - past)
        alone = attention(q[row:row + 1, :, first:], k[row:row + 1, :, start:], v[row:row + 1, :, start:], None)
        assert torch.equal(got[row:row + 1, :, first:], alone)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_causal_attention_reads_coded_caches_as_stored(kind):
    from minicpm.cache import make_cache
    from minicpm.config import preset

    config = preset("tiny")  # a small GQA shape
    cache = make_cache(config, 2, 40, kind, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    k, v = (torch.randn(2, kv, 30, d, generator=g).bfloat16() for _ in range(2))
    cache.write(0, k, v)
    q = torch.randn(2, heads, 12, d, generator=g).bfloat16()
    got = cache.attend_prefill(0, q, 30, None)
    assert got is not None and got.dtype == torch.float32
    cache.dtype = torch.float32  # read the dequantized keys and values back unrounded
    k_deq, v_deq = cache.read(0, 30)
    want = F.scaled_dot_product_attention(q.float(), k_deq, v_deq, attn_mask=causal_mask(12, 30), enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert cache.attend_prefill(0, q, 30, causal_mask(12, 30)) is None  # other masks: the caller's path


def test_causal_attention_declines_what_it_does_not_serve():
    q, k, v = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    assert causal_attention(q.half(), k.half(), v.half()) is None          # fp16
    assert causal_attention(q[..., :24], k[..., :24], v[..., :24]) is None  # head_dim not a multiple of 16
    assert causal_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v) is None  # strided head_dim
    assert causal_attention(q.clone().requires_grad_(), k, v) is None        # autograd: SDPA has a backward
    # where it declines, `attention` still gives the queries-last causal result
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(4, 6))
    torch.testing.assert_close(attention(q.clone().requires_grad_(), k, v, None).detach(), want)
    torch.testing.assert_close(attention(q, k, v, None), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16, torch.int8])
def test_decode_attention_slots_are_independent_rows(kind):
    """Rows reading their own slots over their own ranges give, bit for bit, what each gives
    alone, and what SDPA gives over those positions."""
    g = torch.Generator().manual_seed(1)
    slots, kv, heads, max_len, d = 5, 2, 4, 40, 32
    k, v = (torch.randn(slots, kv, max_len, d, generator=g) for _ in range(2))
    scales = None
    if kind == torch.int8:  # codes and per-position scales, as Int8KVCache stores them
        scales = [torch.rand(slots, kv, max_len, 1, generator=g) / 50 for _ in range(2)]
        k, v = ((t * 40).round().clamp(-127, 127).to(torch.int8) for t in (k, v))
    else:
        k, v = k.to(kind), v.to(kind)
    q = torch.randn(4, heads, 1, d, generator=g)
    rows, starts, ends = torch.tensor([3, 0, 4, 1]), torch.tensor([0, 5, 0, 17]), torch.tensor([1, 33, 40, 18])
    extra = {} if scales is None else {"k_scales": scales[0], "v_scales": scales[1]}
    together = decode_attention(q, k, v, 40, rows=rows, starts=starts, ends=ends, **extra)
    for i in range(4):
        one = slice(i, i + 1)
        alone = decode_attention(q[one], k, v, 40, rows=rows[one], starts=starts[one], ends=ends[one], **extra)
        assert torch.equal(alone, together[one])
        r, lo, hi = rows[i], starts[i], ends[i]
        keys, values = k[r:r + 1, :, lo:hi].float(), v[r:r + 1, :, lo:hi].float()
        if scales is not None:
            keys, values = keys * scales[0][r:r + 1, :, lo:hi], values * scales[1][r:r + 1, :, lo:hi]
        ref = F.scaled_dot_product_attention(q[one], keys, values, enable_gqa=True)
        torch.testing.assert_close(together[one], ref, rtol=1e-4, atol=1e-5)
    assert decode_attention(q, k, v, 40, rows=torch.tensor([0, 1, 2, 5]), ends=ends, **extra) is None  # no slot 5


def test_decode_attention_left_padding_sums_as_alone():
    """A left-padded row (mask) reduces over its real positions exactly as the unpadded row does."""
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(2, 2, 48, 32, generator=g) for _ in range(2))
    q = torch.randn(2, 4, 1, 32, generator=g)
    mask = torch.ones(2, 1, 1, 45, dtype=torch.bool)
    mask[1, ..., :13] = False  # row 1: 13 pads, then 32 real positions
    padded = decode_attention(q, k, v, 45, mask)
    alone = decode_attention(q[1:], k[1:, :, 13:].contiguous(), v[1:, :, 13:].contiguous(), 32)
    assert torch.equal(padded[1:], alone)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


CHECK = """
import warnings, torch
warnings.simplefilter("always")
from minicpm.kernels.linear import KERNEL_F32 as KERNEL, linear_f32
from minicpm.kernels.attention import KERNEL as ATTENTION
print(linear_f32(torch.ones(1, 8), torch.ones(4, 8), None), ATTENTION.library())
print("reason:", KERNEL.reason)
"""


def test_switched_off_by_environment():
    out = _python(CHECK, MINICPM_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None None"
    assert "MINICPM_NATIVE=0" in out.stdout and "Warning" not in out.stderr  # asked for: no warning


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    out = _python(CHECK, CC=str(tmp_path / "no-such-cc"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None None"
    assert "no C compiler" in out.stdout
    assert "native fp32 linear kernel unavailable (no C compiler" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_wrong_isa_setting_is_named_and_falls_back(tmp_path):
    out = _python(CHECK, MINICPM_NATIVE_ISA="avx9", XDG_CACHE_HOME=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None None"
    assert "MINICPM_NATIVE_ISA='avx9' is not avx2 or native (unset it" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.rglob("*.so"))


def test_build_is_cached_per_machine(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    for _ in range(2):
        out = _python(CHECK, **env)
        assert out.returncode == 0 and "reason: None" in out.stdout, out.stderr
    built = sorted(p.name for p in (tmp_path / "minicpm" / "kernels").rglob("*.so"))
    assert built == ["attention.so", "linear_f32.so"]  # once each, no temporary files left
    assert not list((tmp_path / "minicpm" / "kernels").rglob(".*"))


PREBUILD = """
import time
from concurrent.futures import wait
from minicpm.kernels.libraries import ALL, QGEMM, prebuild_once
from minicpm.kernels.build import prebuild
prebuild_once()
print("first use:", QGEMM.library() is not None)  # while the prebuild compiles it: waits, then loads
prebuild_once()  # once per process: no second round
start = time.perf_counter()
wait(prebuild(ALL))  # everything cached now: nothing to build
print("second:", time.perf_counter() - start < 5)
"""


def test_prebuild_compiles_every_kernel_once_beside_a_first_use(tmp_path):
    out = _python(PREBUILD, XDG_CACHE_HOME=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["first", "use:", "True", "second:", "True"]
    root = tmp_path / "minicpm" / "kernels"
    built = sorted(p.name for p in root.rglob("*.so"))  # the executor's threads finish before exit
    assert built == ["attention.so", "decode.so", "linear_bf16.so", "linear_f32.so", "qgemm.so", "rotary.so"]
    assert len({p.parent for p in root.rglob("*.so")}) == 6 and not list(root.rglob(".*"))


def test_avx2_path_passes_the_kernel_tests(tmp_path):
    """The kernels built for AVX2 alone (avx512_on_avx2.h, as on CPUs without AVX-512; forced
    with -mno-avx512f where the CPU has it) pass this file's and the int4/int8 kernel's tests,
    the lean runtime's super-block forms (Q4_K, Q6_K), the dropout kernel's mask and their own
    self-checks."""
    from minicpm.kernels.build import cpu_flags

    if "avx512f" not in cpu_flags():
        pytest.skip("no AVX-512 on this CPU: every kernel test here already runs the AVX2 path")
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "not avx2_path and (superblock or native_dropout or not (test_lean or test_lora))",
                          *(os.path.join(tests, f"test_{name}.py") for name in ("kernels", "native_kernel", "lean", "lora"))],
                         capture_output=True, text=True, timeout=900, cwd=os.path.dirname(tests),
                         env={**os.environ, "MINICPM_NATIVE_ISA": "avx2", "XDG_CACHE_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]
    built = sorted(p.name for p in (tmp_path / "minicpm" / "kernels").rglob("*.so"))
    assert built == ["attention.so", "decode.so", "dropout.so", "linear_bf16.so", "linear_f32.so", "qgemm.so",
                     "rotary.so"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_rows", [1, 3])
def test_native_rotary_is_the_python_expression_bitwise(dtype, table_rows):
    """model.apply_rotary through rotary.c: values, output strides and the gradient of x bitwise
    those of the Python expression and its autograd, for a transposed [B, S, H, D] view (as the
    attention makes q and k) with one table for the batch or one per row, and a contiguous x."""
    from minicpm import model as M
    from minicpm.kernels import rotary

    g = torch.Generator().manual_seed(5)
    cos, sin = torch.rand(2, table_rows, 7, 32, generator=g) * 2 - 1
    for x0 in (torch.randn(3, 7, 4, 32, generator=g).to(dtype).transpose(1, 2), torch.randn(3, 4, 7, 32, generator=g).to(dtype)):
        native, plain = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        y = rotary.apply(native, cos, sin)
        assert y is not None, "the rotary kernel should serve on this CPU"
        xf = plain.float()
        ref = (xf * cos[:, None] + M.rotate_half(xf) * sin[:, None]).to(dtype)
        grad = torch.randn(ref.shape, generator=g).to(dtype)
        y.backward(grad)
        ref.backward(grad)
        assert torch.equal(y, ref) and y.stride() == ref.stride()
        assert torch.equal(native.grad, plain.grad)
    assert rotary.apply(x0.half(), cos, sin) is None  # fp16: the Python expression
    assert rotary.apply(x0, cos.requires_grad_(), sin) is None  # gradients for the tables: autograd's
