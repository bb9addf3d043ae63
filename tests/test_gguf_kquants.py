"""Reading k-quant GGUF files (Q2_K .. Q6_K) made by llama.cpp's own quantizer.

gguf-py cannot produce k-quants, so tests/fixtures/kquants/make.py had llama.cpp quantize a tiny
seeded MiniCPM model (rows of one 256-value super-block, two in ffn_down) to Q2_K, Q3_K_M and
Q4_K_M, whose type mixes hold all five k-quants, and recorded what llama.cpp makes of each file.
Here, without llama.cpp:

(a) the stored tensor types are the k-quants llama.cpp's mixes should give;
(b) our dequantized weights are bit for bit gguf-py's decoding of the bytes (read by gguf-py's
    own parser) and llama.cpp's (`dequantize_row_*`, recorded as digests), and lie within each
    type's quantization error of the float32 weights (regenerated from the seed);
(c) our logits from `load_gguf` match llama.cpp's recorded ones. llama.cpp rounds the input of
    every k-quant matrix product to 8 bits (Q8_K: blocks of 256 scaled by their largest
    magnitude); that alone moves these logits by up to 0.023 (measured; they span about +-2.4).
    Rounding our activations the same way brings the difference below 0.001, the float16
    storage of the reference. The float32 model's logits are 6-24 times further from
    llama.cpp's than ours, so the comparison sees the quantized weights, not just the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors import safe_open
from test_gguf import _write_raw

from minicpm.formats.gguf import (
    gguf_to_hf_name,
    hf_to_gguf_name,
    interleave_rope_rows,
    load_gguf,
    read_gguf,
    read_gguf_info,
    write_gguf,
)
from minicpm.formats.gguf_file import GGUFFile

FIXTURES = Path(__file__).parent / "fixtures" / "kquants"
QUANTS = ("Q2_K", "Q3_K_M", "Q4_K_M")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# The type llama.cpp (llama_tensor_get_type, no importance matrix) gives each weight of the
# one-layer model. The tied token_embd.weight doubles as the output matrix and is Q6_K in every
# mix; norms stay F32. (In Q4_K_M, attn_v and ffn_down get Q6_K in the first and last eighth of
# the layers, which one layer is.)
MIXES = {
    "Q2_K": {"attn_q": "Q2_K", "attn_k": "Q2_K", "attn_v": "Q3_K", "attn_output": "Q3_K",
             "ffn_gate": "Q2_K", "ffn_up": "Q2_K", "ffn_down": "Q3_K"},
    "Q3_K_M": {"attn_q": "Q3_K", "attn_k": "Q3_K", "attn_v": "Q5_K", "attn_output": "Q4_K",
               "ffn_gate": "Q3_K", "ffn_up": "Q3_K", "ffn_down": "Q4_K"},
    "Q4_K_M": {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
               "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
}
FILE_TYPES = {"Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15}  # llama_ftype, in general.file_type

# |dequantized - float32| / |float32| (Frobenius) per tensor type. Measured on these Gaussian
# weights: Q2_K 0.296-0.298, Q3_K 0.149-0.151, Q4_K 0.071-0.072, Q5_K 0.036, Q6_K 0.0176-0.0177
# (about halving per extra bit). Bounds: measured + 20 %, each below the next coarser type.
REL_ERROR_BOUND = {"Q2_K": 0.36, "Q3_K": 0.18, "Q4_K": 0.086, "Q5_K": 0.043, "Q6_K": 0.021}

LOGIT_TOLERANCE = 0.05  # plain float32 activations vs llama.cpp's Q8_K ones (measured <= 0.023)
Q8_K_TOLERANCE = 0.003  # with our activations rounded like llama.cpp's (measured <= 0.001)


def _load_make_script():
    spec = importlib.util.spec_from_file_location("kquants_make", FIXTURES / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make = _load_make_script()


@cache
def reference() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURES / "reference.safetensors", "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (no __iter__)
        return tensors, handle.metadata()


@cache
def float32_state() -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in make.model().state_dict().items()}


@cache
def dequantized(quant: str) -> dict[str, torch.Tensor]:
    """HF name -> tensor, as `read_gguf` gives them."""
    _config, tensors, _metadata = read_gguf(make.fixture_path(quant))
    return dict(tensors)


def expected_types(quant: str) -> dict[str, str]:
    out = {"token_embd.weight": "Q6_K", "output_norm.weight": "F32"}
    for layer in range(make.config().num_hidden_layers):
        out[f"blk.{layer}.attn_norm.weight"] = out[f"blk.{layer}.ffn_norm.weight"] = "F32"
        for role, kind in MIXES[quant].items():
            out[f"blk.{layer}.{role}.weight"] = kind
    return out


def rope_heads(gguf_name: str) -> int | None:
    config = make.config()
    role = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else None
    return {"attn_q": config.num_attention_heads,
            "attn_k": config.num_key_value_heads}.get(role)


def in_file_order(gguf_name: str, tensor: torch.Tensor) -> np.ndarray:
    """A tensor from read_gguf back in the file's row order (q/k rows re-interleaved)."""
    heads = rope_heads(gguf_name)
    return (tensor if heads is None else interleave_rope_rows(tensor, heads)).numpy()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


# ------------------------------------------------------------------------------------------------
# The fixtures themselves
# ------------------------------------------------------------------------------------------------
def test_fixture_weights_are_regenerated_exactly():
    """Everything below compares with make.model(): it must be the model the files came from."""
    _tensors, metadata = reference()
    assert make.weights_digest(float32_state()) == metadata["weights_sha256"], (
        "make.model() no longer reproduces the weights tests/fixtures/kquants was made from")


def test_fixtures_are_small():
    sizes = {p.name: p.stat().st_size for p in FIXTURES.iterdir() if p.suffix != ".py"}
    assert sum(sizes.values()) < 2_400_000, sizes


# ------------------------------------------------------------------------------------------------
# (a) stored types
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_stored_types_are_llama_cpp_k_quant_mixes(quant):
    path = make.fixture_path(quant)
    config, types = read_gguf_info(path)
    ours = dict(zip([t.name for t in GGUFFile(path).tensors], types))
    theirs = gguf.GGUFReader(path)
    assert ours == {t.name: t.tensor_type.name for t in theirs.tensors}
    assert ours == expected_types(quant)
    assert theirs.fields["general.file_type"].contents() == FILE_TYPES[quant]
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (256, 512, 1600)


def test_fixtures_cover_every_k_quant():
    stored = {kind for quant in QUANTS for kind in read_gguf_info(make.fixture_path(quant))[1]}
    assert stored == {"F32", *K_QUANTS}


# ------------------------------------------------------------------------------------------------
# (b) dequantized weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_dequantized_weights_match_gguf_py_and_llama_cpp_bit_for_bit(quant):
    path = make.fixture_path(quant)
    ours = dequantized(quant)
    llama_digests = json.loads(reference()[1]["dequantized_sha256"])[quant]
    checked = []
    for info in gguf.GGUFReader(path).tensors:
        kind = gguf.GGMLQuantizationType(info.tensor_type)
        if kind == gguf.GGMLQuantizationType.F32:
            continue
        from_reader = dequantize(info.data, kind)  # gguf-py's parser and decoder
        ours_in_file_order = in_file_order(info.name, ours[gguf_to_hf_name(info.name)])
        assert ours_in_file_order.dtype == np.float32
        assert ours_in_file_order.shape == from_reader.shape, info.name
        assert ours_in_file_order.tobytes() == from_reader.tobytes(), info.name
        digest = hashlib.sha256(ours_in_file_order.tobytes()).hexdigest()
        assert digest == llama_digests[info.name], f"{info.name} differs from llama.cpp's decoding"
        checked.append(info.name)
    assert sorted(checked) == sorted(llama_digests)


@pytest.mark.parametrize("quant", QUANTS)
def test_dequantized_weights_are_close_to_the_float32_ones(quant):
    state = float32_state()
    ours = dequantized(quant)
    assert set(ours) == set(state) - {"lm_head.weight"}  # tied: no output.weight in the file
    types = expected_types(quant)
    for name, exact in state.items():
        if name == "lm_head.weight":
            continue
        kind = types[hf_to_gguf_name(name)]
        assert ours[name].shape == exact.shape, name
        if kind == "F32":
            assert torch.equal(ours[name], exact), name
        else:
            error = relative_error(ours[name], exact)
            assert error <= REL_ERROR_BOUND[kind], f"{name} ({kind}): relative error {error:.4f}"


def test_quantization_error_shrinks_with_bits():
    """Mean relative error per type over all fixtures: every k-quant is decoded at its own
    precision (a type decoded with another's layout would not land in this order)."""
    state = float32_state()
    errors: dict[str, list[float]] = {kind: [] for kind in K_QUANTS}
    for quant in QUANTS:
        types = expected_types(quant)
        for name, tensor in dequantized(quant).items():
            kind = types[hf_to_gguf_name(name)]
            if kind != "F32":
                errors[kind].append(relative_error(tensor, state[name]))
    means = [float(np.mean(errors[kind])) for kind in K_QUANTS]
    print("\nmean relative weight error:", dict(zip(K_QUANTS, np.round(means, 4))))
    # each extra bit at least 1.6x finer (measured ratios 1.97, 2.11, 1.98, 2.03)
    assert all(coarse > 1.6 * fine for coarse, fine in pairwise(means)), means


@pytest.mark.parametrize("kind", K_QUANTS)
def test_rows_of_several_super_blocks_and_expert_stacks(tmp_path, kind):
    """A k-quant tensor is one row-major run of 256-value super-blocks. The bytes of a fixture
    tensor, stored again as a [4, n, 512] expert stack (sliced per expert while still quantized,
    as MoE files are read) and as an [m, 1024] matrix (rows of four super-blocks), read back as
    the same values in the same order: llama.cpp's digest of the original decoding still holds."""
    quant, info = next((quant, info) for quant in QUANTS
                       for info in GGUFFile(make.fixture_path(quant)).tensors
                       if info.tensor_type.name == kind)
    raw = np.array(GGUFFile(make.fixture_path(quant)).tensor_data(info)).reshape(-1)
    block_bytes = gguf.GGML_QUANT_SIZES[info.tensor_type][1]
    stack = raw.reshape(4, info.n_elements // (4 * 512), 2 * block_bytes)
    wide = raw.reshape(info.n_elements // 1024, 4 * block_bytes)
    path = _write_raw(tmp_path / f"{kind}.gguf", "llama", {
        "blk.0.ffn_up_exps.weight": (stack, info.tensor_type),
        "blk.0.ffn_down.weight": (wide, info.tensor_type)})

    _config, tensors, _metadata = read_gguf(path)
    read = dict(tensors)
    experts = [read[f"model.layers.0.mlp.experts.{e}.w3.weight"] for e in range(4)]
    assert all(e.shape == (info.n_elements // 2048, 512) for e in experts)
    assert read["model.layers.0.mlp.down_proj.weight"].shape == (info.n_elements // 1024, 1024)
    expected = json.loads(reference()[1]["dequantized_sha256"])[quant][info.name]
    for values in (torch.cat(experts), read["model.layers.0.mlp.down_proj.weight"]):
        assert hashlib.sha256(values.numpy().tobytes()).hexdigest() == expected


# ------------------------------------------------------------------------------------------------
# (c) logits against llama.cpp's
# ------------------------------------------------------------------------------------------------
def round_like_q8_k(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_K rounding of activations, back to float: per block of 256 values,
    scale = -127 / (the value of largest magnitude), round to nearest (ties to even), at most
    127, times 1 / scale."""
    blocks = x.reshape(-1, 256)
    largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = torch.where(largest == 0, 0.0, -127.0 / largest)
    q = torch.round(iscale * blocks).clamp(max=127)
    return (q / torch.where(iscale == 0, 1.0, iscale)).reshape(x.shape)


@pytest.fixture(scope="module")
def float32_logits(tmp_path_factory) -> torch.Tensor:
    """Our logits from the float32 GGUF of the same model (what llama.cpp quantized)."""
    ids = reference()[0]["input_ids"].long()[None]
    net = make.model()
    path = write_gguf(net.config, net.state_dict().items(), make.tokenizer(),
                      tmp_path_factory.mktemp("kquants") / "minicpm-f32.gguf", file_type="f32")
    model, _tokenizer = load_gguf(path)
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("quant", QUANTS)
def test_logits_match_llama_cpp(quant, float32_logits):
    tensors, _metadata = reference()
    ids = tensors["input_ids"].long()[None]
    theirs = tensors[f"logits.{quant}"].float()
    model, tokenizer = load_gguf(make.fixture_path(quant))
    assert tokenizer.encode(make.PROMPT) == ids[0].tolist()
    with torch.no_grad():
        ours = model(ids)[0]
        hooks = [module.register_forward_pre_hook(lambda _m, args: (round_like_q8_k(args[0]),))
                 for module in model.modules() if isinstance(module, torch.nn.Linear)]
        assert len(hooks) == 7 + 1  # every k-quant matrix: 7 in the layer and the tied head
        rounded = model(ids)[0]
        for hook in hooks:
            hook.remove()

    diff = float((ours - theirs).abs().max())
    diff_rounded = float((rounded - theirs).abs().max())
    diff_float32 = float((float32_logits - theirs).abs().max())
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    print(f"\n{quant}: max |ours - llama.cpp| {diff:.4f}, with Q8_K activations "
          f"{diff_rounded:.5f}; float32 model {diff_float32:.4f}; argmax agreement {agree:.2f}; "
          f"max |logit| {float(theirs.abs().max()):.2f}")
    assert diff <= LOGIT_TOLERANCE
    assert diff_rounded <= Q8_K_TOLERANCE
    assert agree >= 0.95
    # The quantized weights, not just the model, are what matches: the float32 model is far off
    # (measured 6.2x for Q4_K_M, 11x and 24x for the coarser mixes).
    assert diff_float32 >= 4 * diff


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_model_stays_close_to_the_float32_one(quant, float32_logits):
    """Not garbage: the quantized model predicts like the float32 one. Relative drift of the
    logits measured: Q2_K 0.46, Q3_K_M 0.21, Q4_K_M 0.12 (under twice the weight error of the
    mix; unrelated logits would give ~1.4, all-zero ones 1)."""
    ids = reference()[0]["input_ids"].long()[None]
    model, _tokenizer = load_gguf(make.fixture_path(quant))
    with torch.no_grad():
        ours = model(ids)[0]
    drift = float((ours - float32_logits).norm() / float32_logits.norm())
    agree = float((ours.argmax(-1) == float32_logits.argmax(-1)).float().mean())
    print(f"\n{quant}: relative logit drift from float32 {drift:.3f}, argmax agreement {agree:.2f}")
    assert drift <= {"Q2_K": 0.55, "Q3_K_M": 0.26, "Q4_K_M": 0.16}[quant]
    assert agree >= 0.9
