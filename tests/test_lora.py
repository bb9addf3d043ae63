"""LoRA and QLoRA: a fresh adapter changes nothing, merging is exact, the PEFT layout loads in
`peft` on the transformers Llama export with our logits, and `minicpm merge` checks itself."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.formats.hf import save_pretrained
from minicpm.tokenizer import Tokenizer
from minicpm.training.lora import (
    LoraLinear,
    LoraSpec,
    adapters_disabled,
    add_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    target_names,
)
from tests.conftest import FIXTURES, random_model, variant_config

IDS = torch.tensor([[1, 5, 17, 42, 9, 3, 77, 120, 8, 64]])


def _randomize_adapters(model, seed: int = 1) -> None:
    """Give B non-zero values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_B.weight.data.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", ["2b", "moe", "llama"])
def test_fresh_adapter_leaves_the_model_unchanged(name):
    model = random_model(variant_config(name), seed=0).eval()
    torch.set_grad_enabled(False)  # the same kernels before and after (frozen or not)
    try:
        before = model(IDS)
        wrapped = add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), seed=0)
        assert wrapped and all(isinstance(model.get_submodule(n), LoraLinear) for n in wrapped)
        assert torch.equal(model(IDS), before)  # B starts at zero
        _randomize_adapters(model)
        assert not torch.allclose(model(IDS), before)
        with adapters_disabled(model):
            assert torch.equal(model(IDS), before)
    finally:
        torch.set_grad_enabled(True)


def test_default_targets_are_every_linear_of_the_layers_but_not_the_head():
    model = random_model(variant_config("1b"), seed=0)
    names = target_names(model, "all-linear")
    short = {n.rsplit(".", 1)[-1] for n in names}
    assert short == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 7 * model.config.num_hidden_layers and "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in target_names(model, ["q_proj", "v_proj"])} == {"q_proj", "v_proj"}
    with pytest.raises(MiniCPMError, match="no Linear matches"):
        target_names(model, ["query"])


def test_only_the_adapters_train():
    model = random_model(variant_config("2b"), seed=0)
    add_lora(model, LoraSpec(r=2), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("name", ["2b", "128k", "llama"])
def test_merged_equals_unmerged(name):
    model = random_model(variant_config(name), seed=0).eval()
    add_lora(model, LoraSpec(r=4, alpha=16, dropout=0.0), seed=0)
    _randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        assert merge_lora(model) == 7 * model.config.num_hidden_layers
        merged = model(IDS)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4 * float(adapted.abs().max()))


def test_adapter_round_trip_in_peft_layout(tmp_path):
    model = random_model(variant_config("2b"), seed=0).eval()
    add_lora(model, LoraSpec(r=4, alpha=8, targets="q_proj,v_proj"), seed=0)
    _randomize_adapters(model)
    expected = model(IDS)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight" in keys
    fresh = random_model(variant_config("2b"), seed=0).eval()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(IDS), expected, rtol=0, atol=0)


def test_adapter_of_another_model_is_refused(tmp_path):
    model = random_model(variant_config("1b"), seed=0)
    add_lora(model, LoraSpec(r=2), seed=0)
    save_adapter(model, tmp_path / "adapter")
    other = random_model(variant_config("2b"), seed=0)  # 2 layers, not 4
    with pytest.raises(MiniCPMError, match="does not have"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(MiniCPMError, match="adapter_config.json is missing"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("name", ["llama", "2b"])
def test_peft_loads_our_adapter_on_the_transformers_llama_export(tmp_path, name):
    """The adapter in PEFT's layout, applied by `peft` to transformers' LlamaForCausalLM (the
    llama export; for a muP model with the residual scale folded into o_proj/down_proj, the
    adapter is written for that export), gives our logits."""
    import peft
    import transformers

    from minicpm.formats.convert import convert

    tokenizer = Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")
    config = variant_config(name, vocab_size=tokenizer.vocab_size)
    model = random_model(config, seed=0).eval()
    save_pretrained(model, tokenizer, tmp_path / "base")
    convert(str(tmp_path / "base"), tmp_path / "llama", to="llama", progress=False)
    add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), seed=0)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", for_llama_export=True)
    with torch.no_grad():
        ours = model(IDS)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", torch_dtype=torch.float32).eval()
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs = peft_model(IDS).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_qlora_trains_adapters_over_an_int4_base():
    from minicpm.quantization import QuantizedLinear, dequantize_model, quantize_model

    model = random_model(variant_config("2b", hidden_size=64, intermediate_size=128), seed=0)
    quantize_model(model, bits=4, group_size=32, head="bf16")
    add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), seed=0)
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in model.modules() if isinstance(m, LoraLinear))
    _randomize_adapters(model)
    model.train()
    logits = model(IDS)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], IDS[0, 1:])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # every adapter gets a gradient, the first layer's too (x reaches it through int4 layers)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    reference = dequantize_model(copy.deepcopy(model))  # the same adapters on the dequantized base
    with torch.no_grad():
        adapted = reference(IDS)
        merge_lora(model)
        assert model.config.quantization is None
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-4, atol=1e-4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpm.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_merge_cli_writes_a_checkpoint_equal_to_the_adapter(tmp_path):
    import minicpm

    tokenizer = Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")
    model = random_model(variant_config("1b", vocab_size=tokenizer.vocab_size), seed=0).eval()
    save_pretrained(model, tokenizer, tmp_path / "base")
    add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), seed=0)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    done = _cli("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    assert "merged logits match the adapter's" in done.stdout + done.stderr
    merged, _ = minicpm.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    again = _cli("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--force" in again.stderr
    bad = _cli("merge", str(tmp_path / "base"), str(tmp_path / "nowhere"), str(tmp_path / "m2"))
    assert bad.returncode == 2 and "adapter_config.json is missing" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "m2").exists()


def _module_update(x, layer: LoraLinear, dropout: float, mask=None):
    """The update as nn.Dropout and the two nn.Linear compute it (the version that keeps a mask
    and a dropped-out copy of x per adapter for the backward pass); `mask`: this 0/1 mask
    instead of one drawn by bernoulli_."""
    if mask is None:
        dropped = torch.nn.functional.dropout(x, dropout, training=True)
    else:
        dropped = x * mask * (1 / (1 - dropout))
    return layer.lora_B(layer.lora_A(dropped.to(layer.lora_A.weight.dtype))) * layer.scaling


@pytest.mark.parametrize("alpha", [8, 6])
@pytest.mark.parametrize("mask", ["native", "bernoulli"])
@pytest.mark.parametrize("bf16", [False, True])
def test_low_rank_update_equals_dropout_and_two_linears(bf16, mask, alpha, monkeypatch):
    """Same mask, same products in the same order: the output and the gradients of x, A and B
    are bitwise those of the module version, with or without bf16 autocast; the mask the native
    kernel hashes from a seed drawn from PyTorch's generator, or (where it cannot serve) bernoulli_'s.
    alpha / r = 2 is applied to B, not to the output (exact for a power of two); 1.5 to the output."""
    from minicpm.kernels import dropout as native
    from minicpm.training.lora_update import low_rank_update

    if mask == "bernoulli":
        monkeypatch.setattr(native, "available", lambda x, dtype: False)
    else:
        assert native.available(torch.ones(1), torch.bfloat16), "the dropout kernel should serve on this CPU"
    layer = LoraLinear(torch.nn.Linear(24, 40, bias=False), LoraSpec(r=4, alpha=alpha, dropout=0.25))
    torch.nn.init.normal_(layer.lora_B.weight)
    results = []
    for run in ("modules", "function"):
        layer.zero_grad()
        x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(11)
        drawn = native.keep_mask(x.shape, 0.25, native.draw_seed()) if mask == "native" else None
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if run == "modules":
                out = _module_update(x, layer, 0.25, drawn)
                if drawn is not None:
                    native.draw_seed()  # what the function draws
            else:
                out = low_rank_update(x, layer.lora_A.weight, layer.lora_B.weight, 0.25, layer.scaling)
        (out.float() * torch.linspace(-1, 1, 40)).sum().backward()
        results.append((out, x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone(),
                        torch.rand(1)))  # the generator goes on from the same place
    for modules, function in zip(*results):
        assert torch.equal(modules, function)
    assert torch.count_nonzero(results[1][1]) < results[1][1].numel()  # dropout did drop inputs


def test_native_dropout_mask_rate_seeds_and_threads():
    """The hashed mask keeps 1 - p of the values (binomial bounds), is a function of the seed
    alone (not of the thread count), differs between seeds, and scales the kept values exactly
    as x * (1 / (1 - p)) rounded to the output type; signed zeros where dropped."""
    from minicpm.kernels import dropout as native

    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(3))
    for p in (0.05, 0.1, 0.5):
        kept = native.keep_mask(x.shape, p, 1234).mean().item()
        assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.dropped(x, 0.1, 99, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, native.dropped(x, 0.1, 99, torch.bfloat16))
    mask = native.keep_mask(x.shape, 0.1, 99)
    assert torch.equal(one, (x * mask * (1 / 0.9)).to(torch.bfloat16))
    assert not torch.equal(mask, native.keep_mask(x.shape, 0.1, 100))
    dropped = native.dropped(-x.abs(), 0.1, 99, torch.float32)
    assert torch.all(torch.signbit(dropped[mask == 0]))  # -|x| * 0 is -0, as PyTorch's product
    assert not native.available(x, torch.float16) and not native.available(x.half(), torch.float32)  # bernoulli_'s


def test_low_rank_update_keeps_only_x_for_the_backward_pass():
    from minicpm.training.lora_update import low_rank_update

    layer = LoraLinear(torch.nn.Linear(24, 40, bias=False), LoraSpec(r=4, alpha=8, dropout=0.1))
    x = torch.randn(5, 24, requires_grad=True)

    def kept_like_x(update) -> list[torch.Tensor]:
        """The tensors of x's size that autograd keeps for the backward pass."""
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            update()
        return [t for t in kept if t.numel() == x.numel()]

    module = kept_like_x(lambda: _module_update(x, layer, 0.1))
    assert len(module) == 2  # the mask and the dropped-out copy
    function = kept_like_x(lambda: low_rank_update(x, layer.lora_A.weight, layer.lora_B.weight, 0.1, layer.scaling))
    assert len(function) == 1 and function[0].data_ptr() == x.data_ptr()  # x itself, no copy
