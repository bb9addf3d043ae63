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
from gguf_helpers import write_raw
from safetensors import safe_open

from minicpm.formats.gguf import (
    gguf_to_hf_name,
    hf_to_gguf_name,
    interleave_rope_rows,
    load_gguf,
    read_gguf,
    read_gguf_info,
    write_gguf,
)
from minicpm.formats.gguf.container import GGUFFile
from minicpm.kernels import attention as attention_kernels

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
    path = write_raw(tmp_path / f"{kind}.gguf", "llama", {
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
def test_logits_match_llama_cpp(quant, float32_logits, monkeypatch):
    # PyTorch's attention: with activations rounded to 8 bits below, a 1e-6 difference in the
    # attention sums (our causal kernel's order against SDPA's) can flip a whole rounding step
    # (0.0125 seen); this test is about the weights
    monkeypatch.setattr(attention_kernels, "causal_attention", lambda q, k, v: None)
    tensors, _metadata = reference()
    ids = tensors["input_ids"].long()[None]
    theirs = tensors[f"logits.{quant}"].float()
    model, tokenizer = load_gguf(make.fixture_path(quant), dtype=torch.float32)  # the float reader
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
    model, _tokenizer = load_gguf(make.fixture_path(quant), dtype=torch.float32)
    with torch.no_grad():
        ours = model(ids)[0]
    drift = float((ours - float32_logits).norm() / float32_logits.norm())
    agree = float((ours.argmax(-1) == float32_logits.argmax(-1)).float().mean())
    print(f"\n{quant}: relative logit drift from float32 {drift:.3f}, argmax agreement {agree:.2f}")
    assert drift <= {"Q2_K": 0.55, "Q3_K_M": 0.26, "Q4_K_M": 0.16}[quant]
    assert agree >= 0.9


# ------------------------------------------------------------------------------------------------
# (d) writing k-quants ourselves (minicpm.formats.gguf.quantize, write_gguf(..., "q4_k_m"))
# ------------------------------------------------------------------------------------------------
# Measured on the fixture model: 96-100 % of our Q4_K and Q6_K super-blocks are byte-identical to
# llama.cpp's (84 % for Q5_K); the rest differ where two candidate scales tie to within float32
# summation order, and the weight RMSE differs by at most 0.07 % either way.
MIN_IDENTICAL_BLOCKS = {"Q4_K": 0.93, "Q5_K": 0.75, "Q6_K": 0.93}
MAX_RMSE_RATIO = 1.005  # ours / llama.cpp's, per tensor


def rmse(values: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sqrt(np.mean((values.astype(np.float64) - exact) ** 2)))


@pytest.fixture(scope="module")
def our_q4_k_m(tmp_path_factory) -> Path:
    net = make.model()
    return write_gguf(net.config, net.state_dict().items(), make.tokenizer(),
                      tmp_path_factory.mktemp("ours") / "minicpm-q4_k_m.gguf", file_type="q4_k_m")


def test_our_q4_k_m_is_llama_cpps_q4_k_m(our_q4_k_m):
    """The same float32 weights through our writer and through llama.cpp's quantizer: the same
    type for every tensor, and blocks that are (nearly all) byte for byte the same, so the bit
    layout and the scale search are llama.cpp's."""
    ours, theirs = GGUFFile(our_q4_k_m), GGUFFile(make.fixture_path("Q4_K_M"))
    assert {t.name: t.tensor_type.name for t in ours.tensors} == expected_types("Q4_K_M")
    assert ours.metadata["general.file_type"] == FILE_TYPES["Q4_K_M"]
    their_tensors = {t.name: t for t in theirs.tensors}
    state = float32_state()
    for info in ours.tensors:
        kind = info.tensor_type.name
        if kind == "F32":
            continue
        mine = np.asarray(ours.tensor_data(info))
        other = np.asarray(theirs.tensor_data(their_tensors[info.name]))
        block = gguf.GGML_QUANT_SIZES[info.tensor_type][1]
        same = float((mine.reshape(-1, block) == other.reshape(-1, block)).all(1).mean())
        exact = in_file_order(info.name, state[gguf_to_hf_name(info.name)])
        ratio = rmse(dequantize(mine, info.tensor_type), exact) / rmse(
            dequantize(other, info.tensor_type), exact)
        print(f"\n{info.name} {kind}: {same:.3f} of blocks identical, RMSE ratio {ratio:.5f}")
        assert same >= MIN_IDENTICAL_BLOCKS[kind], info.name
        assert ratio <= MAX_RMSE_RATIO, info.name


def test_our_q5_k_is_llama_cpps():
    """Q5_K (Q4_K_M gives it to attn_output of 8-expert models) against the Q3_K_M fixture's."""
    from minicpm.formats.gguf.quantize import encode_k_quant

    info = next(t for t in GGUFFile(make.fixture_path("Q3_K_M")).tensors
                if t.tensor_type.name == "Q5_K")
    theirs = np.asarray(GGUFFile(make.fixture_path("Q3_K_M")).tensor_data(info))
    exact = in_file_order(info.name, float32_state()[gguf_to_hf_name(info.name)])
    ours = encode_k_quant(torch.from_numpy(exact), "Q5_K")
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    same = float((ours.reshape(-1, 176) == theirs.reshape(-1, 176)).all(1).mean())
    ratio = rmse(dequantize(ours, info.tensor_type), exact) / rmse(
        dequantize(theirs, info.tensor_type), exact)
    assert same >= MIN_IDENTICAL_BLOCKS["Q5_K"] and ratio <= MAX_RMSE_RATIO, (same, ratio)


def awkward_rows() -> torch.Tensor:
    """Rows of 512 values: Gaussian, heavy-tailed, all zero, constant, all negative, one huge
    outlier, denormal-small, a half-zero block."""
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randn(512, generator=gen),
            torch.randn(512, generator=gen) ** 3,
            torch.zeros(512),
            torch.full((512,), 0.25),
            -torch.rand(512, generator=gen) - 0.5,
            torch.randn(512, generator=gen).index_fill_(0, torch.tensor([100]), 1e3),
            torch.randn(512, generator=gen) * 1e-30,
            torch.cat([torch.zeros(256), torch.randn(256, generator=gen)])]
    return torch.stack(rows).float()


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_encoder_round_trip(kind):
    """Our encoder -> gguf-py's decoder (the one read_gguf uses): bounded error on ordinary rows,
    exact zeros, no NaN/inf on degenerate ones, and the same bytes for every row whether
    encoded alone or with others (blocks are independent)."""
    from minicpm.formats.gguf.quantize import encode_k_quant

    x = awkward_rows()
    packed = encode_k_quant(x, kind)
    qtype = gguf.GGMLQuantizationType[kind]
    assert packed.shape == (8, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = torch.from_numpy(dequantize(packed, qtype))
    assert torch.isfinite(back).all()
    bound = REL_ERROR_BOUND[kind]
    assert relative_error(back[0], x[0]) <= bound
    assert relative_error(back[1], x[1]) <= 2 * bound  # heavy tails: a few sub-blocks stretched
    assert torch.equal(back[2], x[2])  # all zero stays exactly zero
    assert relative_error(back[3], x[3]) <= 0.01  # constant rows: one level fits
    assert relative_error(back[4], x[4]) <= bound
    assert abs(float(back[5, 100]) - 1e3) <= 1e3 * bound  # the outlier keeps its size...
    assert relative_error(back[5, 256:], x[5, 256:]) <= bound  # ...and spoils only its block
    assert back[6].abs().max() <= 1e-28
    assert torch.equal(back[7, :256], x[7, :256])
    assert relative_error(back[7, 256:], x[7, 256:]) <= bound
    alone = np.concatenate([encode_k_quant(row[None], kind) for row in x])
    assert np.array_equal(alone, packed)


def test_k_quant_encoder_on_stacks_and_bad_rows():
    from minicpm.formats.gguf.quantize import encode_k_quant

    stack = torch.randn(3, 4, 512, generator=torch.Generator().manual_seed(1))
    assert encode_k_quant(stack, "Q4_K").shape == (3, 4, 2 * 144)
    assert np.array_equal(encode_k_quant(stack, "Q6_K")[1], encode_k_quant(stack[1], "Q6_K"))
    with pytest.raises(ValueError, match="multiple of 256"):
        encode_k_quant(torch.zeros(2, 320), "Q4_K")


# The layers llama.cpp's `use_more_bits` picks (first and last eighth, every third in between),
# written out by hand for the real depths.
MORE_BITS_LAYERS = {
    40: [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39],
    52: [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 45, 46, 47, 48,
         49, 50, 51],
    3: [2],  # 3 // 8 = 0 and 7 * 3 // 8 = 2: only the last layer
}


def planned_types(config) -> dict[str, str]:
    """GGUF name -> type write_gguf would give, planned from shape-only (meta) tensors."""
    from test_gguf import hf_shapes

    from minicpm.formats.gguf.write import plan_tensors

    tensors = {name: torch.empty(shape, device="meta") for name, shape in hf_shapes(config).items()}
    return {item.name: item.qtype.name for item in plan_tensors(config, tensors, "q4_k_m")}


@pytest.mark.parametrize("shape", ["minicpm-2b", "minicpm-1b", "minicpm-2b-128k",
                                   "minicpm-moe-8x2b", "tiny"])
def test_q4_k_m_type_mix_follows_llama_cpp(shape):
    """llama.cpp's Q4_K_M (llama-quant.cpp): output matrix Q6_K (Q8_0 if its rows are not whole
    super-blocks); attn_v and ffn_down Q6_K on the use_more_bits layers; everything else Q4_K;
    8-expert models get attn_v/attn_k Q8_0 and attn_output Q5_K. Then rows that are not whole
    super-blocks fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (MiniCPM-2B's ffn_down has
    rows of 5760 = 22.5 x 256; the tiny shapes' rows of 64 and 160 hold no super-block at all)."""
    from minicpm.config import preset

    config = preset(shape)
    types = planned_types(config)
    fits = {"Q4_K": "Q4_K", "Q5_K": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
    fallback = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q8_0": "Q8_0"}

    def stored(kind: str, row: int) -> str:
        return (fits if row % 256 == 0 else fallback)[kind]

    d, f = config.hidden_size, config.intermediate_size
    more = MORE_BITS_LAYERS[config.num_hidden_layers]
    eight = config.num_experts == 8
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    expected = {head: "Q6_K" if d % 256 == 0 else "Q8_0", "output_norm.weight": "F32"}
    if not config.tie_word_embeddings:
        expected["token_embd.weight"] = stored("Q4_K", d)
    ffn = "_exps" if config.num_experts else ""
    for i in range(config.num_hidden_layers):
        p = f"blk.{i}."
        expected.update({
            p + "attn_norm.weight": "F32", p + "ffn_norm.weight": "F32",
            p + "attn_q.weight": stored("Q4_K", d),
            p + "attn_k.weight": "Q8_0" if eight else stored("Q4_K", d),
            p + "attn_v.weight": "Q8_0" if eight else stored("Q6_K" if i in more else "Q4_K", d),
            p + "attn_output.weight": stored("Q5_K" if eight else "Q4_K", d),
            p + f"ffn_gate{ffn}.weight": stored("Q4_K", d),
            p + f"ffn_up{ffn}.weight": stored("Q4_K", d),
            p + f"ffn_down{ffn}.weight": stored("Q6_K" if i in more else "Q4_K", f),
        })
        if config.num_experts:
            expected[p + "ffn_gate_inp.weight"] = "F32"
    assert types == expected
    if shape == "minicpm-2b":  # the fallbacks the brief of this exporter names
        assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.5.ffn_down.weight"] == "Q5_0"
        assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.5.attn_v.weight"] == "Q4_K"


def test_convert_q4_k_m_loads_back_close_to_the_float_model(tmp_path, spm_tokenizer_dir):
    """`minicpm convert SRC OUT.gguf --to gguf --type q4_k_m` on a checkpoint whose shapes give
    every type of the mix (hidden 256: Q4_K/Q6_K; ffn_down rows of 640: Q5_0/Q8_0), then
    `minicpm.load` of the file: logits close to the float32 model's."""
    import minicpm
    from minicpm.cli.main import main
    from minicpm.config import MiniCPMConfig
    from minicpm.formats.hf import save_pretrained
    from minicpm.loading.assemble import random_model
    from minicpm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(spm_tokenizer_dir)
    config = MiniCPMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=640,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, scale_emb=12.0, dim_model_base=64.0, scale_depth=1.4,
        tie_word_embeddings=True)
    net = random_model(config, seed=5, dtype=torch.float32, std=0.0625)
    source = save_pretrained(net, tokenizer, tmp_path / "ckpt")
    out = tmp_path / "tiny-q4_k_m.gguf"
    assert main(["convert", str(source), str(out), "--to", "gguf", "--type", "q4_k_m"]) == 0
    assert out.with_suffix(".Modelfile").is_file()

    types = {t.name: t.tensor_type.name for t in GGUFFile(out).tensors}
    assert types["token_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.0.ffn_down.weight"] == "Q5_0" and types["blk.1.ffn_down.weight"] == "Q8_0"

    model, loaded_tokenizer = minicpm.load(str(out))
    ids = torch.tensor([loaded_tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        ours, exact = model(ids)[0], net(ids)[0]
    drift = float((ours - exact).norm() / exact.norm())
    agree = float((ours.argmax(-1) == exact.argmax(-1)).float().mean())
    print(f"\nq4_k_m export: relative logit drift {drift:.3f}, argmax agreement {agree:.2f}")
    # measured 0.157 (q8_0 0.017, q6_k 0.052, q4_0 0.200 for the same model): bound in between
    assert drift <= 0.19 and agree >= 0.8
