"""The native int4/int8 kernel (minicpm/kernels/qgemm.py, qgemm.c): against the exact
dequantized fp32 product, its layouts against the checkpoint form, and its fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from minicpm.errors import MiniCPMError
from minicpm.kernels import qgemm as native
from minicpm.quantization import QuantizedLinear

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.reason()}")

# x is quantized to int8 per block of 32 (int8 tiles: scale max|x_b| / 127; int4 tiles: the row's
# scale times a power of two): measured ~0.5% and ~0.8% relative error on Gaussian data.
TOL = 1.5e-2


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """fp32 product with the weight dequantized from the checkpoint form."""
    state = layer.portable_state()
    if layer.bits == 8:
        w = state["qweight"].float() * state["scales"].float()[:, None]
    else:
        from minicpm.quantization.linear import unpack_nibbles
        q = unpack_nibbles(state["qweight"]).float()
        n, k = q.shape
        g = q.reshape(n, k // layer.group_size, layer.group_size)
        w = ((g - state["zeros"].float()[..., None]) * state["scales"].float()[..., None]).reshape(n, k)
    bias = None if layer.bias is None else layer.bias.float()
    return torch.nn.functional.linear(x.float(), w, bias)


def make(bits: int, group: int | None, n: int, k: int, bias: bool = True, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(dtype)
    return QuantizedLinear.from_float(linear, bits, group), linear


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("bits,group,n,k", [(4, 32, 37, 256), (4, 64, 100, 384), (4, 128, 48, 256),
                                            (4, 32, 16, 32), (8, None, 37, 200), (8, None, 64, 256),
                                            (8, None, 5, 17)])
def test_native_matches_dequantized_reference(bits, group, n, k, m):
    layer, _ = make(bits, group, n, k)
    assert layer.kernel == "native"
    x = torch.randn(m, k)
    y = layer(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_error(y, reference(layer, x)) < TOL


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, None)])
def test_bf16_activations_and_model_dtype(bits, group):
    layer, linear = make(bits, group, 96, 256, dtype=torch.bfloat16)
    assert layer.scales.dtype == torch.bfloat16  # metadata kept in the model's dtype
    x = torch.randn(2, 7, 256, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7, 96)
    assert rel_error(y, reference(layer, x)) < TOL
    assert rel_error(layer(x.float()), reference(layer, x)) < TOL  # fp32 x on a bf16 layer: fp32 out


def test_non_contiguous_and_half_inputs():
    layer, _ = make(4, 32, 40, 128)
    base = torch.randn(128, 6)
    x = base.t()  # [6, 128], not contiguous
    assert not x.is_contiguous()
    assert rel_error(layer(x), reference(layer, x)) < TOL
    y16 = layer(x.half())
    assert y16.dtype == torch.float16 and rel_error(y16, reference(layer, x.half())) < TOL


def test_bias_grad_and_bad_shapes():
    layer, _ = make(8, None, 24, 64)
    layer.bias.data = layer.bias.data.double()  # a bias dtype the kernel does not read: added in fp32
    x = torch.randn(2, 64)
    assert rel_error(layer(x), reference(layer, x)) < TOL
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # no backward in the kernel: the dequantize path carries the gradient
    assert torch.allclose(xg.grad, layer.dequantize().float().sum(0).expand(2, -1), rtol=1e-4, atol=1e-4)
    with pytest.raises((ValueError, RuntimeError)):
        layer(torch.randn(2, 63))


def test_threads_do_not_change_the_result():
    layer, _ = make(4, 64, 200, 512)
    x = torch.randn(5, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(2)
        two = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def permuted(layer: QuantizedLinear, perm: torch.Tensor) -> QuantizedLinear:
    """The same codes and metadata as `layer`, its columns taken as x's columns `perm` (act-order)."""
    scales, zeros = layer.scales_zeros()
    return QuantizedLinear(layer.in_features, layer.out_features, layer.bits, layer.group_size, layer.codes(),
                           scales, zeros, layer.bias, input_perm=perm)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, None)])
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (5, torch.bfloat16), (40, torch.float32)])
def test_act_order_layers_gather_x_inside_the_kernel(bits, group, m, dtype):
    """A layer with input_perm multiplies x's columns in the stored order: bitwise the plain
    layer's product of x[:, perm] (the kernel gathers as it quantizes x), whichever path runs."""
    plain, _ = make(bits, group, 48, 256, dtype=dtype)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    layer = permuted(plain, perm)
    assert layer.kernel == "native" and layer.decode_spec() is not None
    x = torch.randn(m, 256, dtype=dtype)
    expect = plain(x[:, perm].contiguous())
    assert torch.equal(layer(x), expect)  # the plan's path (a plan exists after the first call)
    assert torch.equal(layer(x.t().contiguous().t()), expect)  # _forward (non-contiguous x)
    assert torch.equal(layer(x.unsqueeze(0))[0], expect)
    assert not torch.equal(layer(x), plain(x))  # the gather did something
    xg = x.float().clone().requires_grad_()  # autograd goes the dequantize way, gathering in Python
    layer(xg).sum().backward()
    tol = 1e-5 if dtype is torch.float32 else 1e-2  # a bf16 layer's gradient is computed in bf16
    assert rel_error(xg.grad, layer.dequantize().float().sum(0).expand(m, -1)) < tol


def test_an_input_perm_that_is_not_a_permutation_is_refused():
    plain, _ = make(4, 32, 16, 64)
    for bad in (torch.arange(1, 65), torch.zeros(64, dtype=torch.long), torch.arange(32)):
        with pytest.raises(MiniCPMError, match="input_perm is not a permutation of 0..63"):
            permuted(plain, bad)


@pytest.mark.parametrize("bits,group,n,k", [(4, 32, 37, 256), (4, 128, 50, 384), (8, None, 37, 200)])
def test_layout_gives_back_codes_scales_and_rows_exactly(bits, group, n, k):
    torch.manual_seed(1)
    w = torch.randn(n, k)
    from minicpm.quantization.linear import quantize_int4, quantize_int8
    if bits == 8:
        q, scales = quantize_int8(w)
        zeros = None
    else:
        q, scales, zeros = quantize_int4(w, group)
    layer = QuantizedLinear(k, n, bits, group, q, scales, zeros)
    assert layer.kernel == "native"
    assert torch.equal(layer.codes(), q)
    s, z = layer.scales_zeros()
    assert torch.equal(s, scales) and (z is None or torch.equal(z, zeros))
    index = torch.tensor([[0, n - 1], [n // 2, 3]])
    assert torch.equal(layer.rows(index), layer.dequantize()[index])


def test_module_to_bfloat16_keeps_working():
    layer, _ = make(4, 32, 48, 128)
    x = torch.randn(3, 128)
    expected = layer(x)
    layer.to(torch.bfloat16)  # scales and zeros become bf16: the kernel reads them as such
    assert layer.scales.dtype == torch.bfloat16
    assert rel_error(layer(x), expected) < 2e-2


def test_copies_get_their_own_plan():
    import copy
    import pickle
    layer, _ = make(4, 32, 48, 128)
    x = torch.randn(2, 128)
    expected = layer(x)  # the layer now holds pointers to its own tensors
    clone = copy.deepcopy(layer)
    restored = pickle.loads(pickle.dumps(layer))
    del layer
    assert torch.equal(clone(x), expected) and torch.equal(restored(x), expected)


def test_layers_built_in_and_out_of_inference_mode_share_arenas():
    x = torch.randn(1, 1024)
    with torch.inference_mode():
        inside, _ = make(4, 128, 1024, 1024)  # 512 KB of codes: carved from a huge-page arena
        inside(x)
    outside, _ = make(8, None, 512, 1024)
    assert rel_error(outside(x), reference(outside, x)) < TOL
    with torch.inference_mode():
        assert rel_error(inside(x), reference(inside, x)) < TOL


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


CHECK = """
    import torch
    from torch import nn
    from minicpm.kernels import qgemm as native
    from minicpm.quantization import QuantizedLinear
    torch.manual_seed(0)
    for bits, group in ((4, 32), (8, None)):
        linear = nn.Linear(256, 48)
        layer = QuantizedLinear.from_float(linear, bits, group)
        x = torch.randn(3, 256)
        w = layer.dequantize().float()
        ref = x @ w.T + linear.bias
        err = ((layer(x) - ref).norm() / ref.norm()).item()
        assert err < 1.5e-2, err
        print(layer.kernel, native.reason())
"""


def test_disabled_by_env_falls_back_to_pytorch_kernels():
    result = _run(CHECK, MINICPM_NATIVE="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["packed", "disabled", "by", "MINICPM_NATIVE=0"] * 2
    assert "Warning" not in result.stderr  # asked for: nothing to warn about


def test_int8_fallback_with_odd_in_features_is_right():
    """PyTorch's int8 kernel crashes on AVX2 when in_features is not a multiple of 8 and x has
    several rows: such a layer dequantizes instead (a subprocess: a crash must fail, not kill)."""
    check = """
        import torch
        from torch import nn
        from minicpm.quantization import QuantizedLinear
        torch.manual_seed(0)
        for features in (36, 239, 64):
            linear = nn.Linear(features, 64)
            layer = QuantizedLinear.from_float(linear, 8, None)
            x = torch.randn(4, features)
            ref = x @ layer.dequantize().float().T + linear.bias
            assert ((layer(x) - ref).norm() / ref.norm()).item() < 1e-2  # packed: bf16 scales
            print(layer.kernel)
    """
    result = _run(check, MINICPM_NATIVE="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dequantize", "dequantize", "packed"]


def test_missing_compiler_falls_back_with_one_message(tmp_path):
    result = _run(CHECK, CC="/nonexistent", XDG_CACHE_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("packed no C compiler")
    assert result.stderr.count("native int4/int8 kernel unavailable") == 1
    assert "Traceback" not in result.stderr


def test_two_processes_building_at_once(tmp_path):
    code = textwrap.dedent(CHECK)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.split()[0] == "native", out + err
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1 and not list(tmp_path.rglob(".qgemm.so.*"))  # no temporaries left behind


@pytest.mark.parametrize("m", [1, 5, 64])
def test_int4_without_zero_points_is_q4_0s_form(m):
    """No zero points or offsets (zeros None): w = (q - 8) * s, GGUF's Q4_0, 2 bytes of metadata
    per 32 weights. The same values as the offsets form (m = -8s), summed in another order."""
    g = torch.Generator().manual_seed(3)
    n, k = 53, 256
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    x = torch.randn(m, k, generator=g)
    w = ((q.double().reshape(n, -1, 32) - 8) * s.double()[..., None]).reshape(n, k)
    symmetric = native.gemm(x, 4, native.pack_int4(q), native.pack_meta(s), None, n, k, k, 32, None, 2)
    offsets = native.gemm(x, 4, native.pack_int4(q), native.pack_meta(s), native.pack_meta(-8 * s), n, k, k, 32,
                          None, 2, offsets=True)
    assert rel_error(symmetric, offsets) < 1e-6
    assert rel_error(symmetric, x.double() @ w.T) < TOL


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_codes_do_not_saturate(sign):
    """The largest products the tiles can meet: int4 codes 0 and 15 and int8 codes -127 and 127
    against x whose every value quantizes to +-127 (all values of one size). On AVX2 the int4 dots
    gather in 16-bit sums (8 dots of 15 x 127) and the int8 dots run on |code| through vpmaddubsw:
    a saturated sum would be off by thousands. x and the weights are exact here, so the products
    must be exact but for the float scales."""
    n, k, m = 48, 256, 5
    rows = torch.arange(n)[:, None]
    x = sign * torch.ones(m, k) * 0.75
    x[1::2] *= -1  # rows of either sign
    q4 = torch.where(rows % 3 == 0, 0, 15).expand(n, k).to(torch.uint8).contiguous()
    s4 = torch.full((n, k // 32), 0.25, dtype=torch.float16)
    w4 = (q4.double() - 8) * 0.25
    y4 = native.gemm(x, 4, native.pack_int4(q4), native.pack_meta(s4), None, n, k, k, 32, None, 2)
    assert rel_error(y4, x.double() @ w4.T) < 1e-6
    off = native.gemm(x, 4, native.pack_int4(q4), native.pack_meta(s4), native.pack_meta(-8 * s4), n, k, k, 32,
                      None, 2, offsets=True)
    assert rel_error(off, x.double() @ w4.T) < 1e-6
    q8 = torch.where(rows % 2 == 0, -127, 127).expand(n, k).to(torch.int8).contiguous()
    s8 = torch.full((n, 1), 0.5)
    for group, scales in ((None, s8[:, 0].contiguous()), (32, native.pack_meta(s8.expand(n, k // 32).contiguous()))):
        y8 = native.gemm(x, 8, native.pack_int8(q8, k), scales, None, n, k, k, group, None, 2)
        assert rel_error(y8, x.double() @ (q8.double() * 0.5).T) < 1e-6


def test_int4_groups_below_32_are_refused_by_name():
    """tile_int4 reads x in blocks of 32: a group of 16 is a clear ValueError, not a wrong product."""
    n, k = 16, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s = torch.rand(n, k // 16).half()
    with pytest.raises(ValueError, match="group size 16 is not one the int4 tiles take"):
        native.gemm(torch.randn(2, k), 4, native.pack_int4(q), native.pack_meta(s), None, n, k, k, 16, None, 2)


def pow2_block_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] as the int4 tiles quantize it (qgemm.c, quantize_row_pow2): blocks of 32 at the row's
    scale max|x| / 127 times 2^-e, e in 0..15 the largest with max|x_b| 2^e <= max|x|; fp32
    arithmetic, rounding to nearest even. Returns codes [m, k/32, 32] and block scales [m, k/32]."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    bmax = blocks.abs().amax(-1)
    rowmax = bmax.amax(-1, keepdim=True)
    e = torch.zeros_like(bmax, dtype=torch.int32)
    for j in range(1, 16):
        e = torch.where(bmax * 2.0 ** j <= rowmax, j, e)
    inverse = torch.where(rowmax > 0, 127.0 / rowmax, 0.0) * torch.exp2(e.float())
    codes = (blocks * inverse[..., None]).round()
    return codes, rowmax / 127.0 * torch.exp2(-e.float())


@pytest.mark.parametrize("group,offsets", [(32, False), (32, True), (128, True)])
def test_int4_activation_blocks_share_the_rows_scale(group, offsets):
    """The int4 tiles quantize x per block of 32 at the row's scale times a power of two (so a
    block's scale is an exponent add, not a product): the product is that model's to fp32
    rounding, on rows whose blocks span 2^-20..1 of the row's largest (and an all-zero block);
    quantizing each block at its own max|x_b| / 127 (Q8_0's rule) is measurably off here."""
    g = torch.Generator().manual_seed(7)
    n, k, m = 48, 512, 6
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    mins = (torch.rand(n, k // group, generator=g) * -0.1).half()
    sizes = torch.tensor([1.0, 0.7, 0.49, 0.26, 2.0 ** -20, 0.0, 0.51, 0.03] * 2)  # per block of 32
    x = torch.randn(m, k, generator=g) * sizes.repeat_interleave(32)
    x[3] *= 1e4  # rows of other sizes
    x[4] = 0.0
    meta = lambda t: t.double().repeat_interleave(group, dim=1)  # noqa: E731
    w = q.double() * meta(s) + meta(mins) if offsets else (q.double() - 8) * meta(s)
    y = native.gemm(x, 4, native.pack_int4(q), native.pack_meta(s), native.pack_meta(mins) if offsets else None,
                    n, k, k, group, None, 2, offsets=offsets)

    def model(codes, scales):
        return ((codes.double() * scales.double()[..., None]).reshape(m, k)) @ w.T

    expected = model(*pow2_block_codes(x))
    assert rel_error(y, expected) < 2e-6
    assert torch.equal(y[4], torch.zeros(n))
    blocks = x.float().reshape(m, k // 32, 32)
    own = blocks.abs().amax(-1) / 127.0
    q8_0 = torch.where(own[..., None] > 0, blocks / own[..., None], 0.0).round()
    assert rel_error(model(q8_0, own), expected) > 100 * 2e-6


@pytest.mark.parametrize("native_env", ["1", "0"])
def test_gemm_is_the_first_call_of_a_process(native_env):
    """gemm() before anything asked whether the kernel is available: it builds and checks it (or,
    disabled, raises KernelUnavailable saying why), not an AttributeError on the unset library."""
    code = textwrap.dedent("""
        import torch
        from minicpm.kernels import qgemm
        from minicpm.kernels.build import KernelUnavailable
        n, k = 16, 64
        q, s = torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // 32).half()
        try:
            y = qgemm.gemm(torch.randn(2, k), 4, qgemm.pack_int4(q), qgemm.pack_meta(s), None, n, k, k, 32, None, 2)
            print("shape", tuple(y.shape))
        except KernelUnavailable as e:
            print("unavailable:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MINICPM_NATIVE": native_env})
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "shape (2, 16)" if native_env == "1" else "unavailable: native qgemm is unavailable: disabled by MINICPM_NATIVE=0"
    assert out.stdout.strip() == expected
