"""Streaming `quantize_checkpoint` (same tensors as quantize_model + save_pretrained, bounded
memory, every source format) and the tied embedding that reads the int8 head's table."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import variant_config

from minicpm.errors import CheckpointError, MiniCPMError
from minicpm.formats.hf import (
    checkpoint_state_dict,
    iter_tensors,
    load_model,
    save_pretrained,
    weight_files,
)
from minicpm.formats.quantized import quantize_checkpoint
from minicpm.loading.assemble import random_model
from minicpm.quantization import QuantizedEmbedding, QuantizedLinear, quantize_model
from minicpm.quantization import quantize as quantize_module

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def model_of(variant: str, dtype=torch.float32, **overrides):
    return random_model(variant_config(variant, **overrides), seed=1, std=0.1, dtype=dtype)


def stored(directory) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(weight_files(directory)))


def assert_same_checkpoint(a, b):
    ta, tb = stored(a), stored(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.filterwarnings("ignore:.*int4 group size")
@pytest.mark.parametrize("variant,dtype,bits,head,embedding", [
    ("2b", torch.bfloat16, 4, "int8", "head"), ("2b", torch.float32, 8, "int8", "float"),
    ("1b", torch.float32, 4, "bf16", "head"), ("128k", torch.bfloat16, 4, "int8", "head"),
    ("2b", torch.bfloat16, 4, "int4", "head"),
    ("moe", torch.float32, 4, "int8", "head"), ("llama", torch.bfloat16, 8, "int8", "head"),
])
def test_stream_equals_quantize_model_then_save(tmp_path, monkeypatch, variant, dtype, bits, head, embedding):
    src = save_pretrained(model_of(variant, dtype), None, tmp_path / "src")
    reference = quantize_model(load_model(src), bits=bits, group_size=64, head=head, embedding=embedding)
    expected = save_pretrained(reference, None, tmp_path / "ref")
    monkeypatch.setattr(quantize_module, "STREAM_ROWS", 96)  # the head in row slices, as MiniCPM-2B's
    out = quantize_checkpoint(src, tmp_path / "out", bits=bits, group_size=64, head=head, embedding=embedding,
                              progress=False, max_shard_bytes=40_000)
    assert_same_checkpoint(out, expected)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(stored(out))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch files left
    assert torch.equal(load_model(out)(IDS), reference(IDS))


def test_stream_from_bin_and_gguf(tmp_path, tiny_checkpoint):
    import minicpm
    from minicpm.formats.gguf import write_gguf

    model, tokenizer = minicpm.load(tiny_checkpoint)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (tiny_checkpoint / name).exists():
            (bin_dir / name).write_bytes((tiny_checkpoint / name).read_bytes())
    torch.save(dict(stored(tiny_checkpoint)), bin_dir / "pytorch_model.bin")
    gguf = write_gguf(model.config, stored(tiny_checkpoint).items(), tokenizer, tmp_path / "m.gguf", file_type="f32")
    for src in (bin_dir, gguf):
        m, t = minicpm.load(src)
        expected = save_pretrained(quantize_model(m, bits=4, group_size=32), t, tmp_path / f"ref-{src.name}")
        out = quantize_checkpoint(src, tmp_path / f"out-{src.name}", bits=4, group_size=32, progress=False)
        assert_same_checkpoint(out, expected)
        _, loaded_tokenizer = minicpm.load(out)
        assert loaded_tokenizer.encode("hello world") == t.encode("hello world")


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_tied_embedding_reads_the_quantized_head(tmp_path, head):
    model = quantize_model(model_of("2b"), bits=4, group_size=32, head=head)
    assert model.lm_head.bits == int(head[-1])
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.embed_tokens.head is model.lm_head
    assert not [n for n, _ in model.named_parameters() if "embed" in n]  # the float table is gone
    assert not [n for n in model.state_dict() if n.startswith("model.embed_tokens")]
    ids = torch.tensor([[3, 7, 300]])
    rows = model.model.embed_tokens(ids)
    torch.testing.assert_close(rows, model.lm_head.dequantize()[ids])
    path = save_pretrained(model, None, tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["embedding"] == "head" and config["torch_dtype"] == "float32"
    assert "model.embed_tokens.weight" not in stored(path)
    loaded = load_model(path)
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding) and loaded.model.embed_tokens.head is loaded.lm_head
    assert torch.equal(loaded(IDS), model(IDS))


def test_shared_table_costs_little_accuracy():
    """int8 rows (one scale per row) in the embedding: 1.3% of the logits here (int8 and int4 alike);
    SmolLM2 (tied, Q4_1 source): 3.8% (int8) / 4.8% (int4 g64); top-1 agreement 97% / 91%, and
    1 / 2 of 4 greedy 24-token chat replies identical (the others diverge after a few words)."""
    shared = quantize_model(model_of("2b"), bits=8)
    separate = quantize_model(model_of("2b"), bits=8, embedding="float")
    assert isinstance(separate.model.embed_tokens, torch.nn.Embedding)
    error = rel_error(shared(IDS), separate(IDS))
    assert 0 < error < 0.02


def test_float_embedding_and_untied_models_keep_their_table(tmp_path):
    kept = quantize_model(model_of("2b"), bits=4, group_size=32, embedding="float")
    path = save_pretrained(kept, None, tmp_path / "float")
    assert json.loads((path / "config.json").read_text())["quantization"]["embedding"] == "float"
    assert "model.embed_tokens.weight" in stored(path)
    assert type(load_model(path).model.embed_tokens) is torch.nn.Embedding
    untied = quantize_model(model_of("128k"), bits=4, group_size=32)  # "head" asked, nothing to share
    assert type(untied.model.embed_tokens) is torch.nn.Embedding
    assert untied.config.quantization["embedding"] == "float"


def test_checkpoint_without_the_embedding_key_loads_as_before(tmp_path):
    """Written before the shared table: the float embedding is stored and used."""
    model = quantize_model(model_of("2b"), bits=4, group_size=32, embedding="float")
    path = save_pretrained(model, None, tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    del config["quantization"]["embedding"]
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_model(path)
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding
    assert isinstance(loaded.lm_head, QuantizedLinear)
    assert torch.equal(loaded(IDS), model(IDS))


def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path):
    src = save_pretrained(model_of("2b"), None, tmp_path / "src")
    with pytest.raises(MiniCPMError, match="embedding must be one of head, float"):
        quantize_checkpoint(src, tmp_path / "out", embedding="int4")
    with pytest.raises(MiniCPMError, match="already exists"):
        quantize_checkpoint(tmp_path, src, progress=False)
    quantized = quantize_checkpoint(src, tmp_path / "q", bits=8, progress=False)
    with pytest.raises(MiniCPMError, match="already quantized"):
        quantize_checkpoint(quantized, tmp_path / "again", progress=False)
    # a tensor missing from the source: named, and no output directory appears
    from safetensors.torch import save_file

    state = stored(src)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        quantize_checkpoint(src, tmp_path / "broken", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]


ANON = """
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
"""


def _medium_checkpoint(tmp_path, layers: int = 12, **overrides):
    """~360 MB of bf16 (seeded random weights), its largest layer ~6 MB."""
    config = variant_config("2b", hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                            torch_dtype="bfloat16", **overrides)
    return save_pretrained(None, None, tmp_path / "c", config=config, state_dict=checkpoint_state_dict(random_model(config, dtype=torch.bfloat16, std=0.02)))


def _warm(tmp_path):
    return save_pretrained(model_of("2b", torch.bfloat16), None, tmp_path / "w")


def test_streaming_quantization_memory_is_far_below_the_checkpoint(tmp_path):
    """Peak RSS (mapped pages included) grows by the largest tensor and its codes, not the model:
    measured 149-159 MB for 357 MB, mostly the 32000 x 1024 table (65 MB) and its int8 copy."""
    src, warm = _medium_checkpoint(tmp_path), _warm(tmp_path)
    size_mb = (src / "model.safetensors").stat().st_size / 2**20
    script = ANON + textwrap.dedent(f"""
        from minicpm.formats.quantized import quantize_checkpoint
        quantize_checkpoint({str(warm)!r}, {str(tmp_path / "wq")!r}, progress=False)  # lazy imports
        before, top = anon(), peak()
        quantize_checkpoint({str(src)!r}, {str(tmp_path / "q")!r}, bits=4, group_size=128, progress=False)
        print(anon() - before, peak() - top)
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                         check=True).stdout
    grew, peak_grew = map(float, out.split())
    assert size_mb > 300
    assert peak_grew < 0.6 * size_mb, f"peak RSS grew {peak_grew:.0f} MB quantizing {size_mb:.0f} MB"
    # what stays afterwards: allocator caches and thread pools of the first big run, 46-118 MB measured
    assert grew < 0.4 * size_mb, f"anonymous memory grew {grew:.0f} MB quantizing {size_mb:.0f} MB"


def test_loading_keeps_an_untied_embedding_mapped_and_no_float_layers(tmp_path):
    """Untied: the float embedding stays memory-mapped (anonymous memory grows by the quantized
    layers, not by the table); at no time do float copies of the quantized layers exist."""
    src, warm = _medium_checkpoint(tmp_path, layers=4, tie_word_embeddings=False), _warm(tmp_path)
    q = quantize_checkpoint(src, tmp_path / "q", bits=4, group_size=128, progress=False)
    table_mb = 32000 * 1024 * 2 / 2**20
    layers_mb = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816) * 2 / 2**20  # their bf16 size
    script = ANON + textwrap.dedent(f"""
        import torch
        from minicpm.formats.hf import load_model
        load_model({str(warm)!r})(torch.tensor([[1, 2, 3]]))
        before, top = anon(), peak()
        model = load_model({str(q)!r})
        model(torch.tensor([[1, 2, 3]]))
        print(anon() - before, peak() - top)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    grew, peak_grew = map(float, out.split())
    head_mb = table_mb / 2
    quantized_mb = layers_mb / 4 + head_mb  # int4 layers, the int8 head
    assert grew < quantized_mb + 0.25 * table_mb, f"anon grew {grew:.0f} MB"  # the table: a few rows
    # Float copies of the quantized layers (+layers_mb), or their mapped codes left resident beside
    # the repacked ones (+quantized_mb), would show here. Allowed: the kernel's repacking of the
    # largest layer, the int8 head (measured ~4x its size, native.pack_int8's temporaries).
    assert peak_grew < quantized_mb + 5 * head_mb + 0.25 * layers_mb, f"peak grew {peak_grew:.0f} MB"
