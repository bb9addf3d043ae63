"""Published quantized checkpoints (GPTQ v1/v2, AutoAWQ GEMM, bitsandbytes NF4) load exactly, and
`minicpm convert --to gptq` writes GPTQ v1 that loads back to the same weights.

The checkpoints are written by tests/published_helpers.py from the published layouts (loops in
the shape of the reference packers), from tiny seeded models.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.formats import load_checkpoint
from minicpm.formats.convert import convert
from minicpm.formats.hf import save_pretrained
from minicpm.loading.assemble import build_model
from minicpm.quantization import QuantizedLinear, dequantize_model
from tests import published_helpers as ref
from tests.conftest import random_model, variant_config

GPTQ_V1 = {"bits": 4, "group_size": 32, "desc_act": False, "sym": False, "quant_method": "gptq",
           "checkpoint_format": "gptq"}
IDS = torch.tensor([[1, 5, 77, 300, 12, 260, 9, 33]])


def tiny(variant: str = "2b", seed: int = 0):
    return random_model(variant_config(variant), seed=seed)


INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}


def gptq_layers(model, bits=4, group=32, sym=False, act_order=False, v1=True, seed=0, bias=False,
                order_by_input=False):
    """{linear: GPTQ tensors} and {linear: reference dequantized weight [N, K] fp32}.
    `order_by_input`: layers that read one input get one act-order (as GPTQ's Hessians make it)."""
    gen = torch.Generator().manual_seed(seed)
    layers, weights, orders = {}, {}, {}
    for name in ref.decoder_linears(model):
        w = model.get_submodule(name).weight.detach()
        parent, _, leaf = name.rpartition(".")
        key = (parent.rpartition(".")[0], INPUTS[leaf]) if order_by_input and leaf in INPUTS else name
        order = orders.setdefault(key, torch.randperm(w.shape[1], generator=gen)) if act_order else None
        q, zeros, scales, g_idx = ref.gptq_quantize(w, bits, group if group > 0 else w.shape[1], sym, order)
        qweight, qzeros = ref.gptq_pack(q, zeros, bits, v1=v1)
        layers[name] = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}
        if bias:  # AutoGPTQ <= 0.7.1 wrote one for every layer
            layers[name]["bias"] = torch.zeros(w.shape[0], dtype=torch.float16)
        weights[name] = ref.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v1=v1)
    return layers, weights


def reference_model(model, weights: dict, dtype=torch.float32):
    """The float model with the reference dequantized weights in place of the linears', its
    other tensors rounded to fp16 as the checkpoint stores them."""
    state = {k: v.half().to(dtype) for k, v in model.state_dict().items()}
    state.update({f"{name}.weight": w.to(dtype) for name, w in weights.items()})
    return build_model(model.config, state.items(), dtype=dtype, device="cpu")


def float_forward(monkeypatch):
    """Quantized layers built after this run F.linear on their dequantized weight (no int8 x)."""
    monkeypatch.setattr(QuantizedLinear, "_pick_kernel", lambda self, device: "dequantize")


def assert_exact_layers(model, weights: dict):
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear), name
        assert torch.equal(layer.dequantize().float(), w), name


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------ GPTQ

def test_gptq_v1_asym_loads_exactly(tmp_path, monkeypatch):
    model = tiny()
    layers, weights = gptq_layers(model)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    float_forward(monkeypatch)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)
    expected = reference_model(model, weights)(IDS)
    torch.testing.assert_close(loaded(IDS), expected, atol=1e-5, rtol=1e-5)
    assert loaded.config.quantization["method"] == "gptq"
    assert "quantization_config" not in loaded.config.extra


def test_gptq_on_the_native_kernel_is_close(tmp_path):
    """The int4 kernel itself: only its int8 rounding of activations differs (~0.5% per output)."""
    model = tiny()
    layers, weights = gptq_layers(model)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)
    assert rel_error(loaded(IDS), reference_model(model, weights)(IDS)) < 5e-2


def test_gptq_act_order_v2_sym_with_stray_bias(tmp_path, monkeypatch):
    """Scattered g_idx (act-order), GPTQModel v2 zero points, sym, AutoGPTQ's all-zero biases,
    settings only in quantize_config.json, weights named after model_file_base_name."""
    model = tiny("llama")
    layers, weights = gptq_layers(model, sym=True, act_order=True, v1=False, bias=True)
    settings = {**GPTQ_V1, "sym": True, "desc_act": True, "checkpoint_format": "gptq_v2",
                "model_file_base_name": "gptq_model-4bit-32g"}
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, None, quantize_config=settings,
                                weights_name="gptq_model-4bit-32g.safetensors")
    float_forward(monkeypatch)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.input_perm is not None and q_proj.bias is None
    # the permuted columns sum in another order than the reference's: fp32 rounding only
    torch.testing.assert_close(loaded(IDS), reference_model(model, weights)(IDS), atol=5e-5, rtol=1e-5)
    assert sorted(loaded.config.quantization["input_perm"]) == sorted(weights)


def test_gptq_shorter_last_group_runs_on_the_kernel(tmp_path, monkeypatch):
    """in 160, group 128: groups of 128 and 32 -> groups of 32 that share scales, exactly."""
    model = tiny()
    layers, weights = gptq_layers(model, group=128, act_order=True)
    assert layers["model.layers.0.mlp.down_proj"]["scales"].shape == (2, 64)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, {**GPTQ_V1, "group_size": 128})
    float_forward(monkeypatch)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)
    assert loaded.model.layers[0].mlp.down_proj.group_size == 32
    torch.testing.assert_close(loaded(IDS), reference_model(model, weights)(IDS), atol=1e-5, rtol=1e-5)


def test_gptq_stored_g_idx_wins_over_desc_act(tmp_path, monkeypatch):
    """MiniCPM-2B-sft-int4 says desc_act false in quantize_config.json and true in config.json."""
    model = tiny()
    layers, weights = gptq_layers(model, act_order=True)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, {**GPTQ_V1, "desc_act": False},
                                quantize_config={**GPTQ_V1, "desc_act": True})
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)


def test_gptq_act_order_on_the_native_kernel(tmp_path):
    model = tiny()
    layers, weights = gptq_layers(model, act_order=True)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert loaded.model.layers[0].mlp.down_proj.kernel == "native"
    assert rel_error(loaded(IDS), reference_model(model, weights)(IDS)) < 5e-2
    new = loaded.generate(IDS[0].tolist(), max_new_tokens=4, temperature=0)  # layer-by-layer decode
    assert len(new) == 4


def test_gptq_8bit_sym_runs_as_int8(tmp_path, monkeypatch):
    model = tiny()
    layers, weights = gptq_layers(model, bits=8, sym=True, group=-1)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, {**GPTQ_V1, "bits": 8, "group_size": -1, "sym": True})
    float_forward(monkeypatch)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)
    assert loaded.model.layers[0].self_attn.q_proj.bits == 8
    torch.testing.assert_close(loaded(IDS), reference_model(model, weights)(IDS), atol=1e-5, rtol=1e-5)


def test_gptq_8bit_asym_is_dequantized_with_a_warning(tmp_path):
    model = tiny()
    layers, weights = gptq_layers(model, bits=8, group=32)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, {**GPTQ_V1, "bits": 8})
    with pytest.warns(UserWarning, match="gptq layers dequantized to float32 .8-bit zero points other than 128"):
        loaded, _ = load_checkpoint(path, dtype="float32")
    for name, w in weights.items():
        assert torch.equal(loaded.get_submodule(name).weight, w)
    assert loaded.config.quantization is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_in_half_precision(tmp_path, dtype):
    """fp16: the reference's own dequantization (one rounding of an exact product)."""
    model = tiny()
    layers, weights = gptq_layers(model)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    loaded, _ = load_checkpoint(path, dtype=dtype)
    layer = loaded.model.layers[1].mlp.up_proj
    if dtype is torch.float16:
        assert torch.equal(layer.dequantize(), weights["model.layers.1.mlp.up_proj"].half())
    assert loaded(IDS).isfinite().all()


# ------------------------------------------------------------------------------------------- AWQ

def awq_layers(model, group=32):
    layers, weights = {}, {}
    for name in ref.decoder_linears(model):
        w = model.get_submodule(name).weight.detach()
        q, zeros, scales = ref.awq_quantize(w, group)
        layers[name] = {"qweight": ref.awq_pack(q), "qzeros": ref.awq_pack(zeros), "scales": scales}
        weights[name] = ref.awq_dequantize(layers[name]["qweight"], layers[name]["qzeros"], scales, group)
    return layers, weights


AWQ = {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
       "modules_to_not_convert": None}


@pytest.mark.parametrize("variant", ["2b", "llama"])
def test_awq_gemm_loads_exactly(tmp_path, monkeypatch, variant):
    model = tiny(variant)
    layers, weights = awq_layers(model)
    path = ref.write_checkpoint(tmp_path / "awq", model, layers, AWQ)
    float_forward(monkeypatch)
    loaded, _ = load_checkpoint(path, dtype="float32")
    assert_exact_layers(loaded, weights)
    torch.testing.assert_close(loaded(IDS), reference_model(model, weights)(IDS), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- NF4

def test_bitsandbytes_nf4_double_quant_is_dequantized_exactly(tmp_path):
    model = tiny()
    layers, weights = {}, {}
    for name in ref.decoder_linears(model):
        w = model.get_submodule(name).weight.detach()
        layers[name] = ref.nf4_quantize(w)
        weights[name] = ref.nf4_dequantize(layers[name], tuple(w.shape))
    settings = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float16", "llm_int8_skip_modules": ["lm_head"]}
    path = ref.write_checkpoint(tmp_path / "bnb", model, layers, settings)
    with pytest.warns(UserWarning, match="bitsandbytes layers dequantized to float32 .bitsandbytes nf4: .* MB.*NF4"):
        loaded, _ = load_checkpoint(path, dtype="float32")
    for name, w in weights.items():
        assert torch.equal(loaded.get_submodule(name).weight, w), name
    assert rel_error(weights["model.layers.0.mlp.up_proj"], model.model.layers[0].mlp.up_proj.weight) < 0.15
    torch.testing.assert_close(loaded(IDS), reference_model(model, weights)(IDS), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- bad input

def _write_gptq(tmp_path, settings=GPTQ_V1, edit=None, **kwargs):
    model = tiny()
    layers, _ = gptq_layers(model, **kwargs)
    if edit is not None:
        edit(layers)
    return ref.write_checkpoint(tmp_path / "bad", model, layers, settings)


@pytest.mark.parametrize("settings,message", [
    ({**GPTQ_V1, "bits": 3}, "GPTQ 3-bit weights are not supported"),
    ({**GPTQ_V1, "bits": 2}, "GPTQ 2-bit weights are not supported"),
    ({**GPTQ_V1, "quant_method": "hqq"}, "unknown quant_method 'hqq'"),
    ({**GPTQ_V1, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({**GPTQ_V1, "dynamic": {r"-:.*down_proj": {}}}, "'dynamic' per-layer overrides are not supported"),
    ({**GPTQ_V1, "rotation": "hadamard"}, "rotation 'hadamard' is not supported"),
    ({**GPTQ_V1, "pack_dtype": "int16"}, "pack_dtype 'int16' is not supported"),
    ({**AWQ, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit"),
])
def test_unsupported_settings_are_refused_by_name(tmp_path, settings, message):
    path = _write_gptq(tmp_path, settings)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("edit,message", [
    (lambda layers: layers["model.layers.1.self_attn.k_proj"].pop("g_idx"),
     "model.layers.1.self_attn.k_proj.g_idx is missing"),
    (lambda layers: layers["model.layers.0.mlp.up_proj"].update(qweight=torch.zeros(8, 64, dtype=torch.int32)),
     r"model.layers.0.mlp.up_proj.qweight has shape \[8, 64\], expected \[8, 160\]"),
    (lambda layers: layers["model.layers.2.mlp.down_proj"].update(scales=torch.ones(4, 64, dtype=torch.float16)),
     r"down_proj.scales has shape \[4, 64\], expected \[5, 64\]|down_proj.qzeros has shape"),
    (lambda layers: layers["model.layers.0.self_attn.o_proj"].update(bias=torch.ones(64, dtype=torch.float16)),
     "o_proj.bias is not zero, but config.json gives the layer no bias"),
    (lambda layers: layers["model.layers.0.self_attn.o_proj"].update(g_idx=torch.full((64,), 9, dtype=torch.int32)),
     "o_proj.g_idx names groups outside 0..1"),
])
def test_broken_gptq_tensors_are_named(tmp_path, edit, message):
    path = _write_gptq(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_cli_converts_to_gptq_runs_it_and_reports_one_line(tmp_path, tiny_checkpoint):
    run = [sys.executable, "-m", "minicpm.cli.main"]
    out = tmp_path / "gptq"
    converted = subprocess.run(run + ["convert", str(tiny_checkpoint), str(out), "--to", "gptq", "--group-size", "32"],
                               capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    info = subprocess.run(run + ["info", str(out)], capture_output=True, text=True)
    assert info.returncode == 0 and "gptq (gptq) 4-bit, group 32, asym; repacked at load" in info.stdout
    generated = subprocess.run(run + ["generate", str(out), "--prompt", "ab", "--max-new-tokens", "3"],
                               capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr
    bad = _write_gptq(tmp_path, {**GPTQ_V1, "bits": 3})
    failed = subprocess.run(run + ["generate", str(bad), "--prompt", "ab"], capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"error: {bad}/config.json: GPTQ 3-bit weights are not supported; our kernels run 4 and 8 bits"]


# ---------------------------------------------------------------------------------- round trips

def test_our_format_keeps_act_order_layers(tmp_path, monkeypatch):
    """Loaded GPTQ (act-order) -> save_pretrained (our format) -> load: the same layers."""
    model = tiny()
    layers, weights = gptq_layers(model, act_order=True)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    float_forward(monkeypatch)
    loaded, _ = load_checkpoint(path, dtype="float32")
    saved = save_pretrained(loaded, None, tmp_path / "ours")
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    again, _ = load_checkpoint(saved)
    assert_exact_layers(again, weights)
    assert again.model.layers[2].mlp.gate_proj.input_perm is not None
    assert torch.equal(again(IDS), loaded(IDS))


def test_act_order_layers_reading_one_input_share_their_permutation(tmp_path):
    """GPTQ orders q/k/v (and gate/up) alike: loaded, they hold one permutation tensor, so the
    native kernel quantizes their input once (its plans compare the pointer), also once saved in
    our format and loaded again."""
    model = tiny()
    layers, weights = gptq_layers(model, act_order=True, order_by_input=True)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    loaded, _ = load_checkpoint(path, dtype="float32")
    again, _ = load_checkpoint(save_pretrained(loaded, None, tmp_path / "ours"))
    for m in (loaded, again):
        for layer in m.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.q_proj.input_perm is attn.k_proj.input_perm is attn.v_proj.input_perm
            assert mlp.gate_proj.input_perm is mlp.up_proj.input_perm
            assert attn.o_proj.input_perm is not attn.q_proj.input_perm
        assert_exact_layers(m, weights)
    assert torch.equal(again(IDS), loaded(IDS))


@pytest.mark.parametrize("damage", [lambda perm: perm.__setitem__(0, 10 ** 6),  # past x: the kernel would read there
                                    lambda perm: perm.__setitem__(0, perm[1].item())])  # a column twice
def test_a_damaged_input_perm_is_named_at_load(tmp_path, damage):
    """Our format's act-order layer whose input_perm is not a permutation: one error naming the
    layer and the file, not a product over memory past x or a silently wrong one."""
    model = tiny()
    layers, _ = gptq_layers(model, act_order=True)
    loaded, _ = load_checkpoint(ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1), dtype="float32")
    saved = save_pretrained(loaded, None, tmp_path / "ours")
    tensors = load_file(saved / "model.safetensors")
    damage(tensors["model.layers.1.mlp.down_proj.input_perm"])
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.down_proj: input_perm is not a permutation of "
                                              r"0\.\.159 .*the file is damaged, write it again"):
        load_checkpoint(saved)


# ----------------------------------------------------------------------------------- export

def test_export_of_loaded_gptq_is_byte_identical(tmp_path):
    """GPTQ act-order -> our layers -> --to gptq: the same qweight, qzeros, scales and g_idx."""
    model = tiny()
    layers, weights = gptq_layers(model, act_order=True)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    out = convert(str(path), tmp_path / "export", to="gptq")
    written = load_file(str(out / "model.safetensors"))
    for name, parts in layers.items():
        for leaf, tensor in parts.items():
            assert torch.equal(written[f"{name}.{leaf}"], tensor), f"{name}.{leaf}"
    settings = json.loads((out / "quantize_config.json").read_text())
    assert settings == json.loads((out / "config.json").read_text())["quantization_config"]
    assert (settings["bits"], settings["group_size"], settings["desc_act"], settings["sym"],
            settings["checkpoint_format"]) == (4, 32, True, False, "gptq")
    assert written["model.embed_tokens.weight"].dtype == torch.float16


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 32, True), (4, 128, False), (4, -1, False),
                                            (8, -1, True)])
def test_export_of_float_model_loads_back_to_its_weights(tmp_path, tiny_checkpoint, bits, group, sym):
    out = convert(str(tiny_checkpoint), tmp_path / "export", to="gptq", bits=bits, group_size=group, sym=sym)
    written = load_file(str(out / "model.safetensors"))
    loaded, tokenizer = load_checkpoint(out, dtype="float32")
    assert tokenizer is not None
    source, _ = load_checkpoint(tiny_checkpoint)
    for name in ref.decoder_linears(source):
        w = ref.gptq_dequantize(written[f"{name}.qweight"], written[f"{name}.qzeros"], written[f"{name}.scales"],
                                written[f"{name}.g_idx"], bits)
        assert torch.equal(loaded.get_submodule(name).dequantize(), w), name
        assert isinstance(loaded.get_submodule(name), QuantizedLinear), name
        # and it is the weight, quantized: within a step (half, but for the clamped ends of the grid)
        step = written[f"{name}.scales"].float()[written[f"{name}.g_idx"].long()].t()
        assert ((w - source.get_submodule(name).weight).abs() <= step).all(), name
    settings = json.loads((out / "quantize_config.json").read_text())
    assert (settings["bits"], settings["group_size"], settings["sym"]) == (bits, group, sym)


def test_export_refuses_float_zero_points_and_leaves_nothing(tmp_path, tiny_checkpoint):
    from minicpm.formats.quantized import quantize_checkpoint

    rtn = quantize_checkpoint(tiny_checkpoint, tmp_path / "rtn", bits=4, group_size=32, progress=False)
    with pytest.raises(MiniCPMError, match="zero points are not integers in 0..15"):
        convert(str(rtn), tmp_path / "export", to="gptq")
    assert not [p for p in tmp_path.iterdir() if "export" in p.name]  # no partial output
    with pytest.raises(MiniCPMError, match="already quantized"):
        convert(str(rtn), tmp_path / "export", to="gptq", bits=4)
    with pytest.raises(MiniCPMError, match="--bits 4 or 8, got --bits 3"):
        convert(str(rtn), tmp_path / "export", to="gptq", bits=3)
    with pytest.raises(MiniCPMError, match="-1 for one group per row; got --group-size 0"):
        convert(str(rtn), tmp_path / "export", to="gptq", group_size=0)
    with pytest.raises(MiniCPMError, match="apply to --to gptq"):
        convert(str(rtn), tmp_path / "export", to="hf", group_size=32)


def test_dequantize_model_of_a_gptq_model_matches_reference(tmp_path, monkeypatch):
    model = tiny()
    layers, weights = gptq_layers(model, act_order=True)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, GPTQ_V1)
    loaded, _ = load_checkpoint(path, dtype="float32")
    dequantize_model(loaded)
    for name, w in weights.items():
        assert torch.equal(loaded.get_submodule(name).weight, w)
    torch.testing.assert_close(loaded(IDS), reference_model(model, weights)(IDS), atol=1e-5, rtol=1e-5)


def test_default_dtype_is_float32_for_gptq(tmp_path):
    """The files say float16; on a CPU the float parts load as float32, as GGUF's do."""
    model = tiny()
    path = ref.write_checkpoint(tmp_path / "gptq", model, gptq_layers(model)[0], GPTQ_V1)
    loaded, _ = load_checkpoint(path)
    assert loaded.dtype == torch.float32 and loaded.model.embed_tokens.weight.dtype == torch.float32
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # as stored


def test_broken_awq_and_nf4_layers_are_named(tmp_path):
    model = tiny()
    layers, _ = awq_layers(model)
    layers["model.layers.0.mlp.gate_proj"].pop("qzeros")
    path = ref.write_checkpoint(tmp_path / "awq", model, layers, AWQ)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.gate_proj.qzeros is missing"):
        load_checkpoint(path)
    layers = {name: ref.nf4_quantize(model.get_submodule(name).weight.detach()) for name in ref.decoder_linears(model)}
    layers["model.layers.1.self_attn.v_proj"]["weight.absmax"] = torch.zeros(3, dtype=torch.uint8)
    settings = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    path = ref.write_checkpoint(tmp_path / "bnb", model, layers, settings)
    with pytest.raises(CheckpointError, match="v_proj.weight.absmax has 3 values, expected 64"):
        load_checkpoint(path)


def test_per_row_groups_run_without_the_native_kernel(tmp_path, monkeypatch):
    """GPTQ group_size -1 (G = in_features, e.g. 160) where PyTorch's int4 kernel, which takes
    groups of 32..256 only, would otherwise serve (MINICPM_NATIVE=0, other CPUs)."""
    from minicpm.kernels import qgemm

    monkeypatch.setattr(qgemm, "available", lambda: False)
    model = tiny()
    layers, weights = gptq_layers(model, group=-1)
    path = ref.write_checkpoint(tmp_path / "gptq", model, layers, {**GPTQ_V1, "group_size": -1})
    loaded, _ = load_checkpoint(path, dtype="float32")
    kernels = {name: loaded.get_submodule(name).kernel for name in weights}
    assert kernels["model.layers.0.mlp.down_proj"] == "dequantize"  # 160 columns in one group
    assert kernels["model.layers.0.self_attn.q_proj"] == "packed"   # 64: PyTorch's kernel takes it
    for name, w in weights.items():
        layer = loaded.get_submodule(name).dequantize()
        if kernels[name] == "dequantize":
            assert torch.equal(layer, w), name
        else:  # PyTorch's int4 kernel holds the scales in bf16 (as for every int4 layer of ours)
            assert rel_error(layer, w) < 4e-3, name
    assert rel_error(loaded(IDS), reference_model(model, weights)(IDS)) < 2e-2
