"""GPTQ and AWQ (`minicpm quantize --method gptq|awq`): each beats round-to-nearest on the error it
minimises, act-order's g_idx, AWQ's scale folding keeps the float function, the command end to end,
and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_model, variant_config
from test_cli import assert_clean_error, run

from minicpm.quantization import awq
from minicpm.quantization.gptq import (
    Grid,
    Hessian,
    dequantize_with_g_idx,
    gptq_quantize,
    output_error,
)
from minicpm.quantization.layerwise import (
    LayerRunner,
    Settings,
    awq_layer,
    capture_inputs,
    gptq_layer,
    relative_error,
)
from minicpm.quantization.linear import QuantizedLinear, quantize_int4

GEN = torch.Generator().manual_seed(0)


def calibration_inputs(tokens: int = 2048, k: int = 128) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as real activations have."""
    mix = torch.randn(k, k, generator=GEN) / k**0.5
    loud = torch.ones(k)
    loud[torch.randperm(k, generator=GEN)[:8]] = 8.0
    return (torch.randn(tokens, k, generator=GEN) @ mix + 0.1 * torch.randn(tokens, k, generator=GEN)) * loud


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1])
    for chunk in x.split(256):
        h.add(chunk[None])
    return h.matrix


def rtn_same_grid(w: torch.Tensor, bits: int, group: int | None, sym: bool) -> torch.Tensor:
    """Round-to-nearest on GPTQ's own grid: GPTQ without its error feedback."""
    grid, g = Grid(bits, sym), group or w.shape[1]
    parts = []
    for i in range(0, w.shape[1], g):
        scale, zero = grid.fit(w[:, i:i + g])
        parts.append(Grid.values(grid.codes(w[:, i:i + g], scale, zero), scale, zero))
    return torch.cat(parts, dim=1)


# --- GPTQ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym,act_order,mse", [
    (4, 32, False, False, False), (4, 128, False, False, False), (4, 64, True, False, False),
    (4, 32, False, True, False), (8, None, True, False, False), (4, 128, False, True, True), (4, 64, True, False, True),
    (8, None, True, True, True),
])
def test_gptq_reduces_the_output_error_of_round_to_nearest(bits, group, sym, act_order, mse):
    x = calibration_inputs()
    w = torch.randn(96, 128, generator=GEN) * 0.05
    h = hessian_of(x)
    res = gptq_quantize(w, h, bits, group, sym, act_order=act_order, static_groups=act_order, mse=mse)
    actual = ((x @ (w - res.weight).t()).norm() / (x @ w.t()).norm()) ** 2
    assert output_error(w, res.weight, h) == pytest.approx(float(actual), rel=1e-3)  # the formula is the error
    gptq_err = output_error(w, res.weight, h)
    assert gptq_err < 0.7 * output_error(w, rtn_same_grid(w, bits, group, sym), h)
    if bits == 4:  # and our own RTN (float zero points), which the default `minicpm quantize` writes
        q, s, z = quantize_int4(w, group)
        ours = ((q.float().reshape(96, -1, group) - z[..., None]) * s[..., None]).reshape(96, 128)
        assert gptq_err < output_error(w, ours, h)


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, True)])
def test_the_range_search_keeps_the_best_of_the_reference_candidates(bits, sym):
    """Grid(mse=True) against every candidate the reference's MSE grid tries (the min/max range
    times 1 - i/100, i < 80), each scored on its own here."""
    w = torch.randn(64, 32, generator=GEN) * 0.05
    w[torch.arange(64), torch.randint(0, 32, (64,), generator=GEN)] *= 6  # one outlier per row
    plain, searched = Grid(bits, sym), Grid(bits, sym, mse=True)
    scale0, zero0 = plain.fit(w)
    scale, zero = searched.fit(w)

    def error(s, z):
        return (Grid.values(plain.codes(w, s, z), s, z) - w).abs().pow(2.4).sum(dim=1)

    best = error(scale, zero)
    assert torch.all(best <= error(scale0, zero0))
    if bits == 4:  # an outlier per row: at 16 levels, clipping it pays on most rows (at 255, on none here)
        assert torch.count_nonzero(best < error(scale0, zero0)) > 32
    for i in range(80):
        p = 1 - i / 100
        if bits == 8:
            s, z = scale0 * p, None
        else:
            lo = torch.minimum(w.amin(dim=1), torch.zeros(64))
            hi = torch.maximum(w.amax(dim=1), torch.zeros(64))
            if sym:
                hi = torch.maximum(lo.abs(), hi)
                lo = -hi
            s = (hi - lo) * p / plain.maxq
            z = torch.full_like(s, 8.0) if sym else torch.round(-lo * p / s)
        assert torch.all(best <= error(s, z) * (1 + 1e-6))


def test_act_order_g_idx_round_trips():
    x = calibration_inputs()
    w = torch.randn(32, 128, generator=GEN) * 0.05
    h = hessian_of(x)
    res = gptq_quantize(w, h, 4, 32, act_order=True, static_groups=False)
    perm = torch.argsort(torch.diag(h), descending=True)
    # groups are runs of the visiting order, so g_idx is not k // G ...
    assert not torch.equal(res.g_idx.long(), torch.arange(128) // 32)
    for g in range(4):
        assert set(torch.nonzero(res.g_idx == g).flatten().tolist()) == set(perm[32 * g:32 * (g + 1)].tolist())
    # ... and the codes with their g_idx give back the very weights GPTQ worked against
    torch.testing.assert_close(dequantize_with_g_idx(res.codes, res.scales, res.zeros, res.g_idx), res.weight,
                               rtol=0, atol=1e-6)
    # static groups (what `--act-order` writes): g_idx = k // G, our contiguous int4 layout
    static = gptq_quantize(w, h, 4, 32, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(128) // 32)
    layer = QuantizedLinear(128, 32, 4, 32, static.codes, static.scales, static.zeros)
    torch.testing.assert_close(layer.dequantize(), static.weight, rtol=0, atol=1e-6)


# --- whole layers -------------------------------------------------------------------------------------
def layer_and_inputs(variant: str = "2b", **overrides):
    config = variant_config(variant, hidden_size=128, intermediate_size=256, **overrides)
    model = random_model(config, seed=4)
    model.requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(1))
    x = model.model.embed_tokens(ids) * config.embedding_scale
    loud = torch.ones(config.hidden_size)
    loud[torch.randperm(config.hidden_size, generator=torch.Generator().manual_seed(2))[:6]] = 10.0
    return config, model, x * loud  # a few outlier channels, as real activations have


def rtn_layer_error(layer, runner, x, group):
    reference = runner.layer(layer, x)
    for name, m in list(layer.named_modules()):
        if isinstance(m, torch.nn.Linear):
            m.weight.copy_(QuantizedLinear.from_float(m, 4, group).dequantize())
    return relative_error(runner.layer(layer, x), reference, x)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_layer_beats_round_to_nearest(method):
    import copy

    config, model, x = layer_and_inputs()
    runner = LayerRunner(config, x.shape[1])
    layer = model.model.layers[0]
    groups = {n: 64 for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    rtn = rtn_layer_error(copy.deepcopy(layer), runner, x, 64)
    reference = runner.layer(layer, x)
    with torch.no_grad():
        if method == "gptq":
            gptq_layer(layer, runner, x, groups, Settings("gptq", 4))
        else:
            awq_layer(layer, runner, x, groups, Settings("awq", 4), config.model_type)
    err = relative_error(runner.layer(layer, x), reference, x)
    print(method, err, rtn)
    assert err < 0.8 * rtn, (err, rtn)


def test_gptq_layer_replays_the_attention_output_exactly(monkeypatch):
    """After o_proj, gptq_layer replays the attention block's output instead of recomputing it:
    codes and outputs must be bitwise those of passes that run the whole layer every time."""
    import contextlib
    import copy

    from minicpm.quantization import layerwise

    config, model, x = layer_and_inputs("1b")  # GQA
    x = x[:, :24]
    runner = LayerRunner(config, x.shape[1])
    layer = model.model.layers[0]
    groups = {n: 32 for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    rerun = copy.deepcopy(layer)
    with torch.no_grad():
        results, out = gptq_layer(layer, runner, x, groups, Settings("gptq", 4, act_order=True, mse=True))
        assert torch.equal(out, runner.layer(layer, x))  # the replayed pass is the layer's own
        monkeypatch.setattr(layerwise, "replaying", lambda *_: contextlib.nullcontext())
        expected, expected_out = gptq_layer(rerun, runner, x, groups, Settings("gptq", 4, act_order=True, mse=True))
    assert torch.equal(out, expected_out)
    assert results.keys() == expected.keys() and len(results) == 7
    for name, (codes, scales, zeros) in expected.items():
        assert torch.equal(results[name][0], codes) and torch.equal(results[name][1], scales), name
        assert torch.equal(results[name][2], zeros), name


# --- AWQ scale folding --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["2b", "llama-mha", "1b"])
def test_awq_scale_folding_keeps_the_float_model(variant):
    if variant == "llama-mha":  # a Llama with v -> o scaling (same shapes: no GQA)
        config, model, x = layer_and_inputs("llama", num_key_value_heads=4)
    else:
        config, model, x = layer_and_inputs(variant)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    before = model(ids)
    runner = LayerRunner(config, x.shape[1])
    names = []
    with torch.no_grad():
        for layer in model.model.layers:
            plan = awq.scaling_groups(layer, config.model_type)
            names.append([g.prev for g in plan])
            features, x_next = capture_inputs(layer, runner, x, sorted({g.inputs for g in plan}))
            for g in plan:
                linears = [layer.get_submodule(n) for n in g.linears]
                inspect = runner.attention(layer) if g.inspect == "self_attn" else layer.get_submodule(g.inspect or g.linears[0])
                s, _ = awq.search_scale(features[g.inputs], linears, inspect, 4, 64, False)
                assert not torch.allclose(s, torch.ones_like(s))  # a real rescaling, not the identity
                awq.fold_scales(layer.get_submodule(g.prev), linears, s)
            x = x_next
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
    expected = ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    if variant == "llama-mha":
        expected.insert(1, "self_attn.v_proj")
    assert all(n == expected for n in names)


# --- the command --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra,source", [
    ("gptq", ["--sym"], "dir"), ("awq", [], "dir"),
    ("gptq", ["--no-act-order", "--no-mse"], "gguf"),  # a GGUF source (as the default model's), read as float32
])
def test_quantize_load_generate(method, extra, source, tiny_checkpoint, tmp_path):
    from minicpm import load

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / method
    src = tiny_checkpoint
    if source == "gguf":
        src = tmp_path / "tiny.gguf"
        assert run("convert", tiny_checkpoint, src, "--to", "gguf", "--type", "f32").returncode == 0
    result = run("quantize", src, out, "--method", method, "--calib", text, "--samples", 8,
                 "--seqlen", 32, *extra, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "config.json").read_text())["quantization"]
    assert record["method"] == method and record["calibration"] == {"data": str(text), "samples": 8, "seqlen": 32}
    # GPTQ's act-order and range search are on unless turned off; AWQ has neither
    assert record["act_order"] == (method == "gptq" and "--no-act-order" not in extra)
    assert record.get("mse") == ("--no-mse" not in extra if method == "gptq" else None)
    assert record["sym"] == ("--sym" in extra)
    model, tokenizer = load(str(out))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)
    float_model, _ = load(str(tiny_checkpoint))
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    assert relative_error(model(ids), float_model(ids), torch.zeros(())) < 0.5
    assert len(model.generate(ids[0].tolist(), max_new_tokens=4)) == 4
    result = run("generate", out, "--prompt", "The quick", "--max-new-tokens", 3, "--raw")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--method", "gptq", "--calib", "{short}", "--seqlen", "64"], "shorter than one sample"),
    (["--method", "gptq", "--calib", "/no/such/calib.txt"], "/no/such/calib.txt"),
    (["--method", "awq", "--act-order"], "--act-order is a GPTQ option"),
    (["--method", "awq", "--mse"], "--mse is a GPTQ option"),
    (["--method", "rtn", "--no-act-order"], "--no-act-order is a GPTQ option: drop it, or pass --method gptq"),
    (["--method", "rtn", "--mse"], "--mse is a GPTQ option"),
    (["--method", "rtn", "--sym"], "--sym: only for --method gptq or awq"),
    (["--method", "gptq", "--samples", "0"], "--samples must be >= 1"),
    (["--method", "gptq", "--bits", "3"], "bits must be 4 or 8"),
    (["--method", "gptq", "--group-size", "32", "--samples", "2", "--seqlen", "600"], "longer than the model's context (256 tokens)"),
])
def test_bad_calibration_input_is_one_line_and_writes_nothing(args, fragment, tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    out = tmp_path / "out"
    args = [a.format(short=short) for a in args]
    assert_clean_error(run("quantize", tiny_checkpoint, out, *args), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt", "tiny-minicpm"]  # no partial output


def test_safetensors_are_read_layer_by_layer(tmp_path):
    """The files' own order is by name (layers.10 before layers.2); the calibrated pass reads
    them in layer order, so that no layer waits in memory for its turn."""
    from minicpm.formats.hf import iter_tensors, iter_tensors_ordered, save_pretrained, weight_files
    from minicpm.quantization.layerwise import layer_order

    model = random_model(variant_config("2b", num_hidden_layers=12), seed=0)
    src = save_pretrained(model, None, tmp_path / "src", max_shard_bytes=200_000)
    files = weight_files(src)
    assert len(files) > 1
    ordered = list(iter_tensors_ordered(files, layer_order))
    keys = [layer_order(name) for name, _ in ordered]
    assert keys == sorted(keys) and ordered[0][0] == "model.embed_tokens.weight"
    as_stored = [layer_order(name) for name, _ in iter_tensors(files)]
    assert as_stored != sorted(as_stored)  # the files alone would not give that order
    expected = dict(iter_tensors(files))
    assert {n for n, _ in ordered} == expected.keys()
    assert all(torch.equal(t, expected[n]) for n, t in ordered)
