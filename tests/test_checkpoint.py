"""Hugging Face checkpoint directories: round trips in every layout, and clear errors for bad ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_model, variant_config
from safetensors import safe_open

from minicpm.config import MiniCPMConfig
from minicpm.errors import CheckpointError, ConfigError, MiniCPMError
from minicpm.formats.hf import checkpoint_state_dict, load_model, save_pretrained

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 61]])


def test_round_trip_every_variant(variant, tmp_path):
    model = random_model(variant_config(variant))
    save_pretrained(model, None, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.to_hf() == {**model.config.to_hf(), "torch_dtype": "float32"}
    assert torch.equal(loaded(IDS), model(IDS))
    assert json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tied_head_is_stored_once(tmp_path):
    save_pretrained(random_model(variant_config("2b")), None, tmp_path / "tied")
    save_pretrained(random_model(variant_config("128k")), None, tmp_path / "untied")
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    with safe_open(str(tmp_path / "untied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()


def test_tied_checkpoint_with_a_stored_head_copy_loads(tmp_path):
    model = random_model(variant_config("2b"))
    state = checkpoint_state_dict(model)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored, recomputed
    save_pretrained(None, None, tmp_path / "c", config=model.config, state_dict=state)
    loaded = load_model(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(IDS), model(IDS))


def test_sharded_safetensors_with_index(tmp_path):
    model = random_model(variant_config("1b"))
    save_pretrained(model, None, tmp_path / "s", max_shard_bytes=60_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert torch.equal(load_model(tmp_path / "s")(IDS), model(IDS))


def test_pytorch_bin_single_and_sharded(tmp_path):
    model = random_model(variant_config("moe"))
    state = checkpoint_state_dict(model)
    single = tmp_path / "bin"
    single.mkdir()
    model.config.save(single / "config.json")
    torch.save(state, single / "pytorch_model.bin")
    assert torch.equal(load_model(single)(IDS), model(IDS))

    sharded = tmp_path / "binsharded"
    sharded.mkdir()
    model.config.save(sharded / "config.json")
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(load_model(sharded)(IDS), model(IDS))


def test_load_in_another_dtype(tmp_path):
    model = random_model(variant_config("2b"))
    save_pretrained(model, None, tmp_path / "c")
    loaded = load_model(tmp_path / "c", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    save_pretrained(model, None, tmp_path / "b", dtype="bf16")
    assert load_model(tmp_path / "b").dtype == torch.bfloat16  # stored dtype kept by default
    with pytest.raises(MiniCPMError, match="unknown dtype"):
        load_model(tmp_path / "c", dtype="int3")


def _save_state(tmp_path, config, state):
    return save_pretrained(None, None, tmp_path / "bad", config=config, state_dict=state)


def test_missing_tensor_is_named(tmp_path):
    model = random_model(variant_config("2b"))
    state = checkpoint_state_dict(model)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(_save_state(tmp_path, model.config, state))


def test_unexpected_tensor_is_named(tmp_path):
    model = random_model(variant_config("2b"))
    state = checkpoint_state_dict(model)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight"):
        load_model(_save_state(tmp_path, model.config, state))


def test_shape_mismatch_is_named(tmp_path):
    model = random_model(variant_config("2b"))
    config = model.config.replace(intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \[(160, 64|64, 160)\], config\.json implies \[(96, 64|64, 96)\]"):
        load_model(_save_state(tmp_path, config, checkpoint_state_dict(model)))


def test_truncated_safetensors_is_named(tmp_path):
    path = save_pretrained(random_model(variant_config("2b")), None, tmp_path / "c")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_garbage_bin_is_named(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    variant_config("2b").save(path / "config.json")
    (path / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(path)


def test_index_pointing_to_absent_shard(tmp_path):
    path = save_pretrained(random_model(variant_config("2b")), None, tmp_path / "c", max_shard_bytes=60_000)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of"):
        load_model(path)


def test_no_weights_at_all(tmp_path):
    variant_config("2b").save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(tmp_path)


def test_config_errors_name_the_problem(tmp_path):
    good = variant_config("2b").to_hf()
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt_neox'.*supported: minicpm, llama, mistral"):
        MiniCPMConfig.from_hf({**good, "model_type": "gpt_neox"})
    partial = {k: v for k, v in good.items() if k not in ("hidden_size", "num_hidden_layers")}
    with pytest.raises(ConfigError, match="missing required field.*hidden_size, num_hidden_layers"):
        MiniCPMConfig.from_hf(partial)
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope'"):
        MiniCPMConfig.from_hf({**good, "rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ConfigError, match="hidden_act 'gelu_new'"):
        MiniCPMConfig.from_hf({**good, "hidden_act": "gelu_new"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MiniCPMConfig.from_file(tmp_path / "config.json")


def test_official_minicpm_config_defaults():
    """Keys absent from a MiniCPM config.json take the official class defaults."""
    config = MiniCPMConfig.from_hf({"architectures": ["MiniCPMForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                                    "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2})
    assert config.model_type == "minicpm"
    assert (config.scale_emb, config.dim_model_base, config.scale_depth) == (1.0, 1.0, 1.0)
    assert config.tie_word_embeddings is True
    assert config.logit_scale == 8.0  # hidden_size / dim_model_base with dim_model_base 1


def test_unknown_config_keys_survive_a_round_trip():
    raw = {**variant_config("2b").to_hf(), "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig"},
           "use_cache": True}
    assert MiniCPMConfig.from_hf(raw).to_hf()["auto_map"] == raw["auto_map"]


def test_existing_checkpoint_is_never_clobbered(tmp_path, monkeypatch):
    model = random_model(variant_config("2b"))
    path = save_pretrained(model, None, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(MiniCPMError, match="already exists"):
        save_pretrained(model, None, path)

    import minicpm.formats.hf as hf

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(variant_config("2b"), seed=9), None, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary leftovers


def test_weights_are_memory_mapped_not_copied(tmp_path):
    """Loading in the stored dtype maps the file: anonymous memory grows by far less than the weights."""
    config = variant_config("2b", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=8, vocab_size=16000)
    path = save_pretrained(random_model(config, dtype=torch.bfloat16), None, tmp_path / "c")
    warm = save_pretrained(random_model(variant_config("2b"), dtype=torch.bfloat16), None, tmp_path / "w")
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    script = textwrap.dedent(f"""
        import torch
        from minicpm.formats.hf import load_model
        def anon():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
        load_model({str(warm)!r})(torch.tensor([[1, 2, 3]]))  # one-time costs: lazy imports, thread pools
        before = anon()
        model = load_model({str(path)!r})
        model(torch.tensor([[1, 2, 3]]))
        print(anon() - before)
    """)
    grew = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert size_mb > 40
    assert grew < 0.4 * size_mb, f"anonymous memory grew {grew:.0f} MB for {size_mb:.0f} MB of weights"


def test_gptq_style_checkpoint_is_refused_by_name(tmp_path):
    """The official *-int4 repos carry a quantization_config; say so instead of listing qweights."""
    model = random_model(variant_config("2b"))
    path = save_pretrained(model, None, tmp_path / "c")
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="gptq-quantized weights"):
        load_model(path)


def test_unavailable_or_unknown_device_is_a_clear_error(tmp_path):
    path = save_pretrained(random_model(variant_config("2b")), None, tmp_path / "c")
    with pytest.raises(MiniCPMError, match="unknown device 'gpu0'"):
        load_model(path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MiniCPMError, match="no usable CUDA GPU"):
            load_model(path, device="cuda")
