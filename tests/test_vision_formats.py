"""MiniCPM-V through `minicpm quantize`, `minicpm convert --to hf` and `minicpm info`, on the tiny
released-layout fixture (fixtures/minicpmv): the decoder quantized as a text model's is, the
vision tower kept as stored (or int8 when asked), round trips that reload to identical logits,
and clear refusals that leave no output behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import assert_clean_error, run
from test_quantization import rel_error
from test_vision import EXPECTED, REFERENCE

import minicpm
from minicpm.errors import CheckpointError
from minicpm.formats.hf import weight_files
from minicpm.formats.quantized import quantize_checkpoint
from minicpm.quantization import QuantizedLinear, quantize_model
from minicpm.vision import MiniCPMV
from minicpm.vision.image import sliced_images, to_pixel_values
from tests.conftest import pattern, save_tiny_v_checkpoint

CASE = EXPECTED["cases"]["tiles6"]  # an overview and six tiles


def inputs(config) -> tuple[torch.Tensor, list, list]:
    pixels = [to_pixel_values(i) for i in sliced_images(pattern(*CASE["size"]), config)[0]]
    return torch.tensor([CASE["ids"]]), [pixels], [torch.tensor(CASE["bound"])]


def stored(directory: Path) -> dict[str, torch.dtype]:
    names = {}
    for f in weight_files(directory):
        with safe_open(str(f), "pt") as handle:
            names.update({n: handle.get_tensor(n).dtype for n in handle.keys()})
    return names


@pytest.fixture(scope="module")
def reference():
    model, _ = minicpm.load(str(REFERENCE), dtype="float32")
    ids, pixels, bounds = inputs(model.config)
    with torch.no_grad():
        return model, model(ids, pixels, bounds), model.get_vision_embedding(pixels[0])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The fixture quantized by the library call behind `minicpm quantize`: int8 and int4 (group
    32) decoders with the vision tower as stored, and int8 with the vision blocks int8 too."""
    root = tmp_path_factory.mktemp("vq")
    settings = {"int8": dict(bits=8), "int4": dict(bits=4, group_size=32), "int8+vision": dict(bits=8, vision="int8")}
    for name, kwargs in settings.items():
        quantize_checkpoint(str(REFERENCE), root / name, progress=False, **kwargs)
    return root


def test_decoder_quantized_vision_kept_as_stored(quantized):
    names = stored(quantized / "int4")
    assert names["llm.model.layers.0.mlp.up_proj.qweight"] == torch.uint8
    assert names["llm.lm_head.qweight"] == torch.int8
    assert names["vpm.blocks.0.attn.qkv.weight"] == torch.bfloat16  # as released
    assert names["resampler.attn.in_proj_weight"] == torch.bfloat16
    assert {n for n in names if not n.startswith("llm.")} == {n for n in stored(REFERENCE) if not n.startswith("llm.")}
    record = json.loads((quantized / "int4" / "config.json").read_text())["quantization"]
    assert record["bits"] == 4 and record["group_size"] == 32 and record["vision"] == "bf16"


def test_quantized_logits_are_the_decoders_quantization(quantized, reference):
    """Same vision features to the bit; logits exactly what quantizing the decoder of the model
    `load` gives (bf16, as stored) in memory; in fp32, int8 within 5% of the float logits
    (relative norm), int4 worse but bounded (this fixture's decoder, std-0.1 random weights,
    measured 2.9% and 26%; quantize_model on the decoder alone gives the same)."""
    float_model, float_logits, float_features = reference
    ids, pixels, bounds = inputs(float_model.config)
    errors = {}
    for name, bits in (("int8", 8), ("int4", 4)):
        model, _ = minicpm.load(str(quantized / name))
        in_memory, _ = minicpm.load(str(REFERENCE))
        quantize_model(in_memory.llm, bits=bits, group_size=32)
        with torch.no_grad():
            assert torch.equal(model(ids, pixels, bounds), in_memory(ids, pixels, bounds))
        model, _ = minicpm.load(str(quantized / name), dtype="float32")
        assert isinstance(model, MiniCPMV) and isinstance(model.llm.model.layers[0].mlp.up_proj, QuantizedLinear)
        with torch.no_grad():
            assert torch.equal(model.get_vision_embedding(pixels[0]), float_features)
            errors[bits] = rel_error(model(ids, pixels, bounds), float_logits)
    assert errors[8] < 0.05
    assert errors[8] < errors[4] < 0.4


def test_vision_int8_when_asked(quantized, reference):
    float_model, float_logits, float_features = reference
    names = stored(quantized / "int8+vision")
    assert names["vpm.blocks.1.mlp.fc1.qweight"] == torch.int8 and "vpm.blocks.1.mlp.fc1.weight" not in names
    assert names["vpm.blocks.1.mlp.fc1.bias"] == torch.bfloat16
    assert names["vpm.patch_embed.proj.weight"] == torch.bfloat16  # the patch embedding and resampler stay
    assert names["resampler.proj"] == torch.bfloat16
    model, _ = minicpm.load(str(quantized / "int8+vision"), dtype="float32")
    assert isinstance(model.vpm.blocks[0].attn.qkv, QuantizedLinear)
    ids, pixels, bounds = inputs(model.config)
    with torch.no_grad():
        assert 0 < rel_error(model.get_vision_embedding(pixels[0]), float_features) < 0.02  # 0.6% measured
        assert rel_error(model(ids, pixels, bounds), float_logits) < 0.05


def test_quantized_v_model_chats(tmp_path):
    """A V checkpoint with a tokenizer, quantized with the CLI, loads with minicpm.load and
    answers about an image; info describes it."""
    source = save_tiny_v_checkpoint(tmp_path, dtype=torch.bfloat16)
    result = run("quantize", source, tmp_path / "int4", "--group-size", "32")
    assert result.returncode == 0, result.stderr
    model, tokenizer = minicpm.load(str(tmp_path / "int4"))
    assert {p.dtype for p in model.vpm.parameters()} == {torch.bfloat16}
    msgs = [{"role": "user", "content": "What is in the picture?"}]
    answer, context, _ = model.chat(image=pattern(300, 200), msgs=msgs, tokenizer=tokenizer,
                                    sampling=False, max_new_tokens=5)
    assert isinstance(answer, str) and context[-1] == {"role": "assistant", "content": answer}
    info = run("info", tmp_path / "int4")
    assert info.returncode == 0, info.stderr
    line = next(x for x in info.stdout.splitlines() if "quantization:" in x)
    assert "decoder int4" in line and "group 32" in line and "vision tower as stored" in line


@pytest.mark.parametrize("source", ["float", "int8"])
def test_convert_to_hf_round_trips(tmp_path, quantized, source):
    """The released layout (llm.*, vpm.*, resampler.*) written again; reloads to the same logits."""
    src = REFERENCE if source == "float" else quantized / "int8"
    result = run("convert", src, tmp_path / "out", "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert stored(tmp_path / "out") == stored(src)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "minicpmv"
    before, _ = minicpm.load(str(src))
    after, _ = minicpm.load(str(tmp_path / "out"))
    ids, pixels, bounds = inputs(before.config)
    with torch.no_grad():
        assert torch.equal(after(ids, pixels, bounds), before(ids, pixels, bounds))


def test_sharded_release_layout_round_trips(tmp_path):
    model, _ = minicpm.load(str(REFERENCE))
    minicpm.save(model, None, tmp_path / "sharded", max_shard_bytes=1_000_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(stored(REFERENCE))
    again, _ = minicpm.load(str(tmp_path / "sharded"))
    ids, pixels, bounds = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(again(ids, pixels, bounds), model(ids, pixels, bounds))


@pytest.mark.parametrize("target", ["gguf", "llama", "gptq"])
def test_convert_v_to_other_formats_is_refused(tmp_path, target):
    out = tmp_path / ("out.gguf" if target == "gguf" else "out")
    assert_clean_error(run("convert", REFERENCE, out, "--to", target), "MiniCPM-V", "use --to hf")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_vision_option_on_a_text_model_is_refused(tiny_checkpoint, tmp_path):
    assert_clean_error(run("quantize", tiny_checkpoint, tmp_path / "q", "--vision", "int8"), "no vision tower")
    assert not (tmp_path / "q").exists()


def test_bad_v_checkpoints_leave_no_output(tmp_path, quantized):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(REFERENCE / "config.json", broken)
    tensors = {}
    for f in weight_files(REFERENCE):
        tensors.update(load_file(f))
    del tensors["vpm.blocks.1.mlp.fc2.bias"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor.*vpm.blocks.1.mlp.fc2.bias"):
        quantize_checkpoint(str(broken), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    assert_clean_error(run("quantize", quantized / "int8", tmp_path / "q2"), "already quantized")
    assert not (tmp_path / "q2").exists()
