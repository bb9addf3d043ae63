"""The native decode step (minicpm/kernels/decode.c) against the model's Python layers.

Tolerances: bf16 dense models are bitwise equal (every cast is emulated; the kernels are the
same). fp32 differs in the RMSNorm mean's summation order and libm's exp (SiLU): relative
logit error < FP32 = 5e-5 after 12 steps (measured ~1e-6; one run in ~20 went just past 1e-5,
on the old step too: the prefill both paths share is not bitwise repeatable run to run). bf16
MoE: the router's fp32 softmax is not PyTorch's to the last ulp, and a renormalised weight can
round to the neighbouring bf16, so < 3e-2 over 4 steps (fp32 MoE: < FP32).
"""

from __future__ import annotations

import copy

import pytest
import torch

from minicpm.kernels import decode
from minicpm.quantization import quantize_model
from tests.conftest import benchmark_script, random_model, variant_config

FP32 = 5e-5  # relative logit error allowed in fp32 (see the module docstring)

STEPS = 12


def _greedy_logits(model, prompt: torch.Tensor, native: bool, steps: int = STEPS, kv: str = "auto",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the prompt's last position and of `steps` decode steps, fed a fixed token
    sequence (the same for both paths, so that a difference cannot change the inputs)."""
    model.native_decode = native
    b = prompt.shape[0]
    with torch.no_grad():
        cache = model.new_cache(b, prompt.shape[1] + steps + 1, kv)
        out = [model(prompt, attention_mask=mask, cache=cache, last_only=True)[:, -1]]
        for i in range(steps):
            if mask is not None:
                mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            token = torch.full((b, 1), (7 * i + 3) % 300)
            out.append(model(token, attention_mask=mask, cache=cache)[:, -1])
    return torch.stack(out)


def _compare(model, rel: float, **kwargs) -> None:
    prompt = torch.randint(0, 300, (kwargs.pop("batch", 1), 6), generator=torch.Generator().manual_seed(1))
    fast = _greedy_logits(model, prompt, True, **kwargs)
    assert model._native is not None and model._native.ready  # the fast path did run
    ref = _greedy_logits(model, prompt, False, **kwargs)
    err = ((fast - ref).abs().max() / ref.abs().max()).item()
    if rel == 0:
        assert torch.equal(fast, ref)
    else:
        assert err < rel, err


@pytest.mark.parametrize("name", ["2b", "1b", "128k", "moe", "s", "llama"])
def test_fp32_variants_match_python(name):
    # 128k: dynamic NTK past max_position_embeddings (32): 6 + 12 steps cross it
    config = variant_config(name, max_position_embeddings=12) if name == "128k" else variant_config(name)
    _compare(random_model(config), FP32)


@pytest.mark.parametrize("name", ["2b", "1b", "128k", "llama"])  # "s": test_sparse_mlp_* below
def test_bf16_variants_are_bitwise(name):
    _compare(random_model(variant_config(name), dtype=torch.bfloat16), 0)


def _sparsity(model, steps: int = 4) -> float:
    """The share of the first layer's gate outputs that FATReLU zeroes over a short decode."""
    seen = []
    hook = model.model.layers[0].mlp.gate_proj.register_forward_hook(
        lambda module, args, out: seen.append((out <= model.config.hidden_act_param).float().mean()))
    try:
        model.native_decode = False
        _greedy_logits(model, torch.randint(0, 300, (1, 6)), False, steps=steps)
    finally:
        hook.remove()
    return float(sum(seen) / len(seen))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, FP32), (torch.bfloat16, 3e-2)])
def test_sparse_mlp_matches_the_dense_layers(dtype, rel):
    """FATReLU (MiniCPM-S): the native step reads only the active neurons' rows of up and of
    down's transpose (the model stores down's weight so); the same logits as the Python layers
    to float tolerance (fp32 sums in another order), for one row, a batch in lockstep and left
    padding; with model.sparse_mlp False every neuron's rows, the same within tolerance."""
    config = variant_config("s", hidden_act_param=0.05)
    model = random_model(config, dtype=dtype)
    assert model.model.layers[0].mlp.down_proj.weight.t().is_contiguous()  # one row per neuron
    assert 0.3 < _sparsity(model) < 0.9  # the gate's zeros are what the sparse path skips
    _compare(model, rel)
    assert model._native.layers[0].down_rows and not model._native.layers[0].all_neurons
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    _compare(model, rel, batch=3, mask=mask)
    model.sparse_mlp = False
    _compare(model, rel)
    assert model._native.layers[0].all_neurons


def test_sparse_mlp_with_quantized_projections_runs_dense():
    """An int4/int8 up or down has no row-per-neuron layout here: the layer runs dense."""
    model = quantize_model(random_model(variant_config("s")), bits=8, group_size=32)
    _compare(model, FP32)
    assert not model._native.layers[0].down_rows


def test_bf16_moe_within_tolerance():
    _compare(random_model(variant_config("moe"), dtype=torch.bfloat16), 3e-2, steps=4)


def test_bias_and_coded_caches():
    config = variant_config("1b", attention_bias=True, mlp_bias=True)
    model = random_model(config)
    g = torch.Generator().manual_seed(4)  # seeded: an unseeded draw made this test pass or fail by run
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0, 0.3, generator=g)
    _compare(model, FP32)
    # In fp32 the two paths' keys differ in the last bits (other kernels), which can move a key
    # across a rounding boundary of a coded cache: one code step, 1/127 (int8) or 1/15 (int4) of
    # its range, in one channel. The codes are compared bit for bit in bf16 just below.
    for kv, rel in (("int8", 2e-3), ("int4", 2e-2)):
        _compare(model, rel, kv=kv)
        # the step writes codes as the Python cache does, bit for bit; 6 + 30 positions: int4
        # keys fill a block of 32 token by token, then start the next
        _compare(random_model(config, dtype=torch.bfloat16), 0, kv=kv, steps=30)


@pytest.mark.parametrize("bits,dtype", [(4, torch.float32), (8, torch.float32), (4, torch.bfloat16)])
def test_quantized_models(bits, dtype):
    model = quantize_model(random_model(variant_config("1b"), dtype=dtype), bits=bits, group_size=32)
    _compare(model, FP32 if dtype is torch.float32 else 0)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, FP32), (torch.bfloat16, 0)])
def test_act_order_models_take_the_native_step(dtype, rel, shared):
    """GPTQ act-order layers (columns stored in another order than x's) decode in the step: the
    kernel gathers x's columns, so the step serves them and matches the Python layers. Shared:
    q/k/v and gate/up hold one permutation tensor (as loaded), and the step reuses their gathered
    input; not shared: each its own, and the step must gather afresh for each."""
    model = random_model(variant_config("1b"), dtype=dtype)
    benchmark_script("act_order").act_order_int4(model, 32, shared=shared)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.input_perm is not None
    assert (attn.q_proj.input_perm is attn.v_proj.input_perm) == shared
    _compare(model, rel, batch=2)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, FP32), (torch.bfloat16, 0)])
def test_batch_in_lockstep_without_a_mask(dtype, rel):
    # every row at one position: the rotary tables come as one row, which each batch row needs
    _compare(random_model(variant_config("1b"), dtype=dtype), rel, batch=3)


def test_batch_with_left_padding_and_window():
    model = random_model(variant_config("1b", sliding_window=5))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    _compare(model, FP32, batch=3, mask=mask)
    _compare(random_model(variant_config("2b"), dtype=torch.bfloat16), 0, batch=3, mask=mask)


def _slot_logits(model, rows: list[int], native: bool, kv: str = "auto") -> torch.Tensor:
    """Three slots prefilled to different lengths, then 5 decode_slots steps of `rows` (slot 0
    crosses position 32: an int4 cache's second block of keys)."""
    model.native_decode = native
    g = torch.Generator().manual_seed(2)
    lengths = [30, 9, 5]
    with torch.no_grad():
        cache = model.new_cache(3, 40, kv)
        for slot, n in enumerate(lengths):
            model.prefill_slot(torch.randint(0, 300, (n,), generator=g), cache, slot, 0)
        out = []
        positions = torch.tensor([lengths[r] for r in rows])
        for i in range(5):
            ids = torch.tensor([(5 * i + r) % 300 for r in rows])
            out.append(model.decode_slots(ids, cache, torch.tensor(rows), positions))
            positions = positions + 1
    return torch.stack(out, dim=1)  # [rows, steps, vocab]


@pytest.mark.parametrize("bits", [None, 4])
def test_moe_rows_share_each_expert_and_stay_alone(bits):
    """MoE in a batch: each chosen expert runs once on the rows that chose it (gathered), and a
    row's logits are bitwise what it gives alone, also with int4 experts."""
    model = random_model(variant_config("moe"))
    if bits:
        model = quantize_model(model, bits=bits, group_size=32)
    rows = [2, 0, 1]
    together = _slot_logits(model, rows, True)
    assert model._native.ready
    for i, row in enumerate(rows):
        assert torch.equal(together[i], _slot_logits(model, [row], True)[0])
    ref = _slot_logits(model, rows, False)
    assert ((together - ref).abs().max() / ref.abs().max()).item() < FP32


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "int4")])
def test_decode_slots_rows_alone_and_against_python(dtype, kv):
    model = random_model(variant_config("s", sliding_window=6), dtype=dtype)
    together = _slot_logits(model, [2, 0, 1], True, kv)
    assert model._native.ready
    for i, row in enumerate([2, 0, 1]):  # a row's result does not depend on the others
        assert torch.equal(together[i], _slot_logits(model, [row], True, kv)[0])
    ref = _slot_logits(model, [2, 0, 1], False, kv)
    err = ((together - ref).abs().max() / ref.abs().max()).item()
    assert err == 0 if dtype is torch.bfloat16 else err < FP32


def test_falls_back_without_kernel(monkeypatch):
    monkeypatch.setattr(decode.KERNEL, "library", lambda: None)
    model = random_model(variant_config("1b"))
    prompt = torch.randint(0, 300, (1, 4))
    fast = _greedy_logits(model, prompt, True, steps=3)
    assert model._native is not None and not model._native.ready
    assert torch.equal(fast, _greedy_logits(model, prompt, False, steps=3))


def test_rebuilt_after_swap_and_move():
    model = random_model(variant_config("1b"))
    prompt = torch.randint(0, 300, (1, 4))
    _greedy_logits(model, prompt, True, steps=2)
    first = model._native
    quantize_model(model, bits=8)  # swaps every projection: the old structs must not be used
    fast = _greedy_logits(model, prompt, True, steps=3)
    assert model._native is not first and model._native.ready
    assert torch.allclose(fast, _greedy_logits(model, prompt, False, steps=3), rtol=0, atol=1e-4)
    copied = copy.deepcopy(model)  # the raw pointers are not copied: the copy builds its own
    assert copied._native is None
    model.to(torch.float32)
    assert model._native is None


def test_grad_enabled_uses_python_layers():
    model = random_model(variant_config("1b"))
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1, 2]]), cache=cache)
    model(torch.tensor([[3]]), cache=cache)  # grad enabled: never the native step
    assert model._native is None
