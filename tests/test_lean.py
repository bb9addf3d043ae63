"""The lean runtime (minicpm/lean): quantized GGUF files on the native kernels without PyTorch.
Held to the PyTorch model's native decode step (same kernels: equal to float rounding once both
use the same rotary tables), to itself across chunking and cache reuse, to the float model, and
run as `minicpm chat` in a process that never imports torch."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_gguf_native import CONFIG, MODEL_TOLERANCE, native_or_skip, write

import minicpm.lean.model as lean_model
from minicpm import lean
from minicpm.formats.gguf.container import GGUFFile
from minicpm.formats.gguf.read import load_gguf
from minicpm.generation.params import SamplingParams
from minicpm.generation.sampling import sample_next
from minicpm.lean.chat import Sampler
from minicpm.lean.native import kernels

IDS = [1, 5, 9, 77, 200, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71, 69,
       39, 99, 37, 51, 5, 82, 9, 74, 94, 45, 92, 30, 7]  # 40 ids: three chunks of 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny MiniCPM GGUFs (muP scalings, GQA) of every block type the lean runtime runs."""
    native_or_skip()
    out = {}
    mp = pytest.MonkeyPatch()
    for file_type, force in (("q4_0", None), ("q8_0", None), ("q4_k_m", None), ("q6_k", None), ("q4_0", "Q4_1")):
        out[force or file_type] = write(tmp_path_factory.mktemp(force or file_type), file_type, monkeypatch=mp,
                                        force=force)
        mp.undo()
    out["untied"] = write(tmp_path_factory.mktemp("untied"), "q4_0", config=CONFIG.replace(tie_word_embeddings=False))
    # rows of 640 are not whole Q4_K super-blocks: ffn_down falls back to Q5_0 (or Q8_0), as in
    # llama.cpp's MiniCPM-2B Q4_K_M files (intermediate 5760)
    out["q5_0"] = write(tmp_path_factory.mktemp("q5_0"), "q4_k_m", config=CONFIG.replace(intermediate_size=640))
    return out


def torch_steps(model, ids, kv="auto"):
    """The PyTorch model's native decode step, one token at a time: logits [len, vocab]."""
    with torch.inference_mode():
        cache = model.new_cache(1, 64, kv_dtype=kv)
        return np.stack([model.decode_slots(torch.tensor([t]), cache, torch.tensor([0]), torch.tensor([i]))[0].numpy()
                         for i, t in enumerate(ids)])


def torch_rotary(model):
    def tables(positions):
        with torch.inference_mode():
            cos, sin = model.model.rotary_emb(torch.from_numpy(positions)[None], 1)
        return np.ascontiguousarray(cos[0].numpy()), np.ascontiguousarray(sin[0].numpy())
    return tables


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind, kv", [("q4_0", "fp32"), ("Q4_1", "fp32"), ("q8_0", "fp32"), ("q4_k_m", "fp32"),
                                      ("q6_k", "fp32"), ("untied", "fp32"), ("q5_0", "fp32"), ("Q4_1", "int8"),
                                      ("q4_0", "int4")])
def test_lean_is_the_pytorch_decode_step(files, kind, kv, monkeypatch):
    """Also with the quantized KV caches: the same codes as PyTorch's Int8KVCache / Int4KVCache
    (an int4 block rescaled as it fills: 40 positions cross a block boundary). Q4_0 in the
    PyTorch model's form (offsets): the same sums."""
    monkeypatch.setattr(lean_model, "Q4_0_SYMMETRIC", False)
    model, _ = load_gguf(files[kind])
    lm, _ = lean.load(files[kind], threads=2, kv_cache=kv)
    assert lm.config.tie_word_embeddings == (kind != "untied") and lm.config.has_mup_scaling
    lm._rotary = torch_rotary(model)  # numpy's cos/sin may differ from PyTorch's by an ulp
    ids = IDS if kv == "int4" else IDS[:12]
    expected = torch_steps(model, ids, "auto" if kv == "fp32" else kv)
    got = np.stack([lm.forward([t], i) for i, t in enumerate(ids)])
    for step, (a, b) in enumerate(zip(got, expected)):  # the same kernels: head and final norm rounding only
        assert rel(a, b) < 1e-5, step


@pytest.mark.parametrize("kind", ["Q4_1", "q4_k_m", "q4_0", "untied", "q5_0"])
def test_lean_against_the_float_model(files, kind):
    """With its own rotary tables, against the file dequantized to float32 (int8 activations)."""
    if kind == "q5_0":
        types = {t.name: t.tensor_type.name for t in GGUFFile(files[kind]).tensors}
        assert "Q5_0" in {types[f"blk.{i}.ffn_down.weight"] for i in range(CONFIG.num_hidden_layers)}
    reference, _ = load_gguf(files[kind], dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([IDS]))[0, -1].numpy()
    lm, _ = lean.load(files[kind], threads=2)
    assert rel(lm.forward(IDS, 0), expected) < MODEL_TOLERANCE


@pytest.mark.parametrize("kv", ["auto", "fp32", "bf16", "int8", "int4"])
def test_chunks_and_cache_reuse_give_the_same_logits(files, kv, monkeypatch):
    """A chunk's rows attend together (chunk_attention: another fp32 summation order than one row
    at a time), so chunkings agree to the int8 activations' rounding; the same chunks, bitwise."""
    monkeypatch.setattr(lean_model, "CHUNK", 16)  # chunk boundaries inside the 40 ids
    lm, _ = lean.load(files["Q4_1"], threads=2, kv_cache=kv)
    whole = lm.forward(IDS, 0)
    assert lm.tokens == IDS
    one_by_one = [lm.forward([t], i) for i, t in enumerate(IDS)][-1]
    # int4: also a chunk's rows attend to keys coded with the scales of the whole chunk
    assert rel(one_by_one, whole) < (0.1 if kv == "int4" else 0.03)
    lm.forward(IDS[:30], 0)
    expected = lm.forward(IDS[30:], 30)
    lm.forward(IDS, 0)
    lm.forward(IDS[:30] + [3, 4, 5], 0)
    # positions 30.. replaced, 0..29 reused (int4: 0..29 run again, the key tail holding block 1 only)
    assert np.array_equal(lm.forward(IDS[30:], 30), expected if kv != "int4" else whole)
    assert lm.cache.resumable(30, 33) == (0 if kv == "int4" else 30) and lm.cache.resumable(34, 36) == 34
    with pytest.raises(ValueError, match="position 50"):
        lm.forward([1], 50)
    with pytest.raises(ValueError, match="exceed the context"):
        lm.forward([1] * 200, 0)


def test_quantized_caches_are_smaller_and_grow_keeping_what_they_hold(files):
    lm, _ = lean.load(files["Q4_1"], threads=2, kv_cache="int8")
    short = lm.forward(IDS[:5], 0)
    assert lm.cache.capacity == 128  # a tiny context: capped at max_position_embeddings
    models = {kv: lean.load(files["Q4_1"], kv_cache=kv)[0] for kv in ("fp32", "auto", "bf16", "int8")}
    logits = {kv: m.forward(IDS[:5], 0) for kv, m in models.items()}
    assert models["auto"].cache.kind == "f16"  # llama.cpp's default cache
    assert models["bf16"].cache.nbytes == models["auto"].cache.nbytes == models["fp32"].cache.nbytes / 2
    keys = {kv: models[kv].cache.stores[0]["kstore"][0, :, :5] for kv in ("fp32", "auto")}
    assert np.array_equal(keys["auto"].view(np.float16), keys["fp32"].astype(np.float16))  # rounded to nearest
    assert 0 < rel(logits["auto"], logits["fp32"]) < MODEL_TOLERANCE
    assert models["int8"].cache.nbytes < models["fp32"].cache.nbytes / 3  # int8 codes + fp32 scales per head
    assert 0 < rel(logits["bf16"], logits["fp32"]) < MODEL_TOLERANCE  # keys and values rounded to bf16
    with pytest.raises(ValueError, match="KV cache kind 'int2'"):
        lean.load(files["Q4_1"], kv_cache="int2")
    assert np.array_equal(short, lean.load(files["Q4_1"], threads=2, kv_cache="int8")[0].forward(IDS[:5], 0))


def test_chunk_size_does_not_change_the_result(files, monkeypatch):
    """Each row of a qgemm product is computed alone, whatever the rows beside it (attention one
    row at a time here: chunk_attention's tiles sum in another order)."""
    monkeypatch.setattr(kernels(), "chunk_attention", (None, None))
    results = []
    for chunk in (7, 16, 256):
        monkeypatch.setattr(lean_model, "CHUNK", chunk)
        results.append(lean.load(files["q4_k_m"], threads=2)[0].forward(IDS, 0))
    assert all(np.array_equal(r, results[0]) for r in results[1:])


def _cache(kind, rng, kv, max_len, d):
    """Random keys and values [1, KV, max_len, d] in attention.c's layout of a cache kind:
    (kind code, k, v, kscale, vscale)."""
    if kind in ("fp32", "f16", "bf16"):
        k, v = rng.standard_normal((2, 1, kv, max_len, d), dtype=np.float32)
        if kind == "f16":
            return 2, k.astype(np.float16), v.astype(np.float16), None, None
        if kind == "bf16":  # the top halves of fp32 numbers
            return 1, *(np.ascontiguousarray((x.view(np.uint32) >> 16).astype(np.uint16)) for x in (k, v)), None, None
        return 0, k, v, None, None
    if kind == "int8":
        codes = rng.integers(-127, 128, (2, 1, kv, max_len, d), dtype=np.int8)
        return 3, codes[0], codes[1], *(rng.random((2, 1, kv, max_len), dtype=np.float32) * 0.05 + 0.01)
    codes = rng.integers(0, 256, (2, 1, kv, max_len, d // 2), dtype=np.uint8)
    kscale = rng.random((1, kv, max_len // 32, 2, d), dtype=np.float32) * 0.2 - 0.05
    vscale = rng.random((1, kv, max_len, 2), dtype=np.float32) * 0.2 - 0.05
    return 4, codes[0], codes[1], kscale, vscale


@pytest.mark.parametrize("kind", ["fp32", "f16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("past, rows, threads", [(0, 130, 2), (37, 19, 3), (70, 2, 1)])
def test_chunk_attention_is_the_row_attention(kind, past, rows, threads):
    """attention.c's chunk attention (a prompt chunk's rows together, each causal up to itself)
    against its decode attention of the same rows one by one, for every cache kind: GQA, a start
    inside a key tile and an int4 key block, query tiles split between threads."""
    lib = kernels().attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    chunk = lib.minicpm_chunk_attention_team
    chunk.argtypes = [ptr] * 5 + [i64] * 8 + [ctypes.c_int, ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int, ptr]
    lib.minicpm_chunk_attention_floats.restype = i64
    lib.minicpm_decode_attention.argtypes = [ptr] * 9 + [ptr] + [i64] * 7 + [ctypes.c_int, ctypes.c_float, ctypes.c_int]
    rng = np.random.default_rng(past)
    heads, kv, d, max_len = 6, 2, 64, 256
    code, k, v, kscale, vscale = _cache(kind, rng, kv, max_len, d)
    q = rng.standard_normal((rows, heads, d), dtype=np.float32)
    address = (lambda a: None if a is None else a.ctypes.data)
    got, expected = np.full((2, rows, heads, d), np.nan, np.float32)
    work = np.full((threads, lib.minicpm_chunk_attention_floats(past + rows, d)), np.nan, np.float32)
    for tid in range(threads):
        assert chunk(q.ctypes.data, k.ctypes.data, v.ctypes.data, address(kscale), address(vscale), 0, 1, heads, kv,
                     max_len, past, rows, d, code, d ** -0.5, got.ctypes.data, tid, threads, work[tid].ctypes.data) == 0
    ends = np.arange(past + 1, past + rows + 1, dtype=np.int64)
    zeros = np.zeros(rows, np.int64)
    assert lib.minicpm_decode_attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, address(kscale), address(vscale),
                                        None, zeros.ctypes.data, zeros.ctypes.data, ends.ctypes.data,
                                        expected.ctypes.data, rows, 1, heads, kv, max_len, past + rows, d, code,
                                        d ** -0.5, 2) == 0
    assert np.abs(got - expected).max() < 1e-5 * max(1.0, np.abs(expected).max())
    assert chunk(q.ctypes.data, k.ctypes.data, v.ctypes.data, None, None, 0, 1, heads, kv, max_len, max_len, rows,
                 d, code, 1.0, got.ctypes.data, 0, 1, work[0].ctypes.data) == -1  # past the cache: refused


@pytest.mark.parametrize("kind", ["q4_0", "q6_k", "q8_0"])
def test_weights_repacked_a_slice_of_rows_at_a_time_are_the_same(files, kind, monkeypatch):
    whole = lean.load(files[kind], threads=2)[0].forward(IDS, 0)
    monkeypatch.setattr(lean_model, "REPACK_ROWS", 48)  # every matrix in several slices, the last one short
    assert np.array_equal(lean.load(files[kind], threads=2)[0].forward(IDS, 0), whole)


def test_q4_0_symmetric_form_is_the_offsets_form():
    """qgemm's form 2 (w = (q - 8) d, no offsets stored) against form 1 with m = -8d: the same
    weights, sums rounded in another order; both against numpy in fp64."""
    from minicpm.kernels import qgemm_layout as layout
    from minicpm.lean.native import quantized_plan

    rng = np.random.default_rng(1)
    n, k = 45, 256
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    d = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
    x = rng.standard_normal((5, k), dtype=np.float32)
    w = ((q.astype(np.float64) - 8).reshape(n, -1, 32) * d.astype(np.float64)[..., None]).reshape(n, k)
    symmetric = quantized_plan(4, 32, layout.pack_int4(q), d, None, n, k)
    offsets = quantized_plan(4, 32, layout.pack_int4(q), d, (-8 * d.astype(np.float32)).astype(np.float16), n, k)
    assert symmetric.form == layout.FORM_SYMMETRIC and offsets.form == 1
    a, b = (kernels().matmul(p, x, 2) for p in (symmetric, offsets))
    assert rel(a, b) < 1e-6
    assert rel(a, (x.astype(np.float64) @ w.T).astype(np.float32)) < 0.02  # int8-rounded activations


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_q4_k_superblock_form_is_the_offsets_form(m):
    """qgemm's form 3 (Q4_K's d, dmin, 6-bit scales and mins as stored) computes form 1's fp32
    products itself: the same sums, bit for bit, single tiles and pairs, every row count."""
    from gguf import GGMLQuantizationType as T

    from minicpm.formats.gguf.quantize import encode_tensor
    from minicpm.formats.gguf.repack import q4_k_superblocks, repacked_parts
    from minicpm.kernels import qgemm_layout as layout
    from minicpm.lean.native import packed_plan, quantized_plan

    n, k = 45, 512
    raw = encode_tensor(torch.randn(n, k, generator=torch.Generator().manual_seed(m)), T.Q4_K)
    _, _, codes, scales, offsets = repacked_parts(raw, "Q4_K")
    stored, meta = q4_k_superblocks(raw)
    assert np.array_equal(stored, codes) and meta.shape == (n, k // 256 * 20)
    products = quantized_plan(4, 32, layout.pack_int4(codes), scales, offsets, n, k)
    superblocks = packed_plan(4, 32, layout.pack_int4(stored), layout.pack_superblock_meta(meta), None, n, k,
                              superblocks=True)
    assert superblocks.form == layout.FORM_SUPERBLOCK and products.form == 1
    x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
    assert np.array_equal(kernels().matmul(superblocks, x, 2), kernels().matmul(products, x, 2))


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_q6_k_superblock_form_is_the_int8_form(m):
    """qgemm's 6-bit form (Q6_K's codes, int8 scales and fp16 d as stored, 0.82 bytes a weight)
    gives the int8 form's sums (int8 codes, fp32 scales per 16: 1.25 bytes) up to the order of fp32
    roundings, on rows that are not whole tiles; without its super-blocks the width is refused."""
    from gguf import GGMLQuantizationType as T

    from minicpm.formats.gguf.dequantize import to_float32
    from minicpm.formats.gguf.quantize import encode_tensor
    from minicpm.formats.gguf.repack import q6_k_superblocks, repacked_parts
    from minicpm.kernels import qgemm_layout as layout
    from minicpm.lean.native import packed_plan, quantized_plan

    n, k = 45, 768
    raw = encode_tensor(torch.randn(n, k, generator=torch.Generator().manual_seed(m)), T.Q6_K)
    _, _, codes, scales, _ = repacked_parts(raw, "Q6_K")
    stored, meta = q6_k_superblocks(raw)
    assert np.array_equal(stored.astype(np.int16) - 32, codes) and meta.shape == (n, k // 256 * 18)
    int8 = quantized_plan(8, 16, layout.pack_int8(codes, k), scales, None, n, k)
    int6 = packed_plan(6, 16, layout.pack_int6(stored), layout.pack_superblock_meta(meta, 6), None, n, k,
                       superblocks=True)
    x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
    y = kernels().matmul(int6, x, 2)
    assert rel(y, kernels().matmul(int8, x, 2)) < 1e-6
    assert rel(y, x @ to_float32(raw, T.Q6_K).reshape(n, k).T) < 0.02  # int8-rounded activations
    plain = packed_plan(6, 16, layout.pack_int6(stored), layout.pack_meta(scales), None, n, k)
    with pytest.raises(RuntimeError, match="failed"):
        kernels().matmul(plain, x, 1)


def test_int4_head_is_close_to_the_stored_one(files):
    """The head rounded again to int4 groups of 32: the same logits up to that rounding, and the
    values it holds within half a step of the stored ones."""
    from minicpm.lean.model import rtn_int4

    stored = lean.load(files["q8_0"], threads=2)[0].forward(IDS, 0)
    int4 = lean.load(files["q8_0"], threads=2, head="int4")[0].forward(IDS, 0)
    assert 0 < rel(int4, stored) < 0.1 and np.argmax(int4) == np.argmax(stored)
    w = np.random.default_rng(2).standard_normal((20, 64), dtype=np.float32)
    bits, group, q, scale, low = rtn_int4(w)
    back = (q.reshape(20, -1, 32) * scale[..., None].astype(np.float32) + low[..., None].astype(np.float32))
    assert (bits, group, scale.dtype) == (4, 32, np.float16) and q.max() <= 15
    assert np.all(np.abs(back.reshape(20, 64) - w) <= scale.astype(np.float32).repeat(32, 1) * 0.5 + 1e-3)
    with pytest.raises(ValueError, match="head 'int2'"):
        lean.load(files["q8_0"], head="int2")


def test_threads_do_not_change_the_result(files):
    one, _ = lean.load(files["q8_0"], threads=1)
    two, _ = lean.load(files["q8_0"], threads=2)
    assert np.array_equal(one.forward(IDS, 0), two.forward(IDS, 0))


def test_what_the_lean_runtime_refuses(files, tmp_path, tiny_checkpoint):
    f32 = write(tmp_path, "f32")
    assert "of type F32" in lean.why_not(f32)  # the tied table is the head: a float head is refused too
    assert lean.why_not(tiny_checkpoint) == "it runs GGUF files only"
    assert lean.why_not(files["Q4_1"]) is None
    with pytest.raises(Exception, match="lean runtime cannot run"):
        lean.load(f32)


@pytest.mark.parametrize("kw", [dict(temperature=0.3, top_p=0.8), dict(temperature=1.0, top_k=20),
                                dict(temperature=0.7, min_p=0.05, repetition_penalty=1.3),
                                dict(temperature=1.0, presence_penalty=1.0, logit_bias={7: 5.0})])
def test_sampling_draws_what_pytorch_draws(kw):
    """The same distribution as sample_next (20,000 draws each, fixed seeds)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(300) * 3).astype(np.float32)
    params = SamplingParams(**kw, seed=1)
    prompt = [1, 2, 3, int(np.argmax(logits))]
    sampler = Sampler(params, 300, prompt)
    sampler.observe(4)
    ours = np.bincount([sampler.sample(logits) for _ in range(20000)], minlength=300) / 20000
    seen = torch.zeros(20000, 300, dtype=torch.bool)
    seen[:, prompt + [4]] = True
    counts = torch.zeros(20000, 300)
    counts[:, 4] = 1
    draws = sample_next(torch.from_numpy(logits).expand(20000, -1), params, torch.Generator().manual_seed(1),
                        seen, counts)
    theirs = np.bincount(draws.numpy(), minlength=300) / 20000
    if params.top_k or params.top_p < 1 or params.min_p:  # the same tokens cut off
        assert np.array_equal(ours > 0, theirs > 0)
    assert np.abs(ours - theirs).max() < 0.02


def run_chat(*args, stdin: str):
    """`minicpm chat` in a fresh process that reports afterwards whether torch was imported."""
    code = ("import sys; from minicpm.cli.main import main; rc = main(sys.argv[1:]); "
            "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "chat", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("kv, head", [("auto", "stored"), ("int8", "stored"), ("int4", "int4")])
def test_chat_runs_without_torch(files, kv, head):
    result = run_chat(files["Q4_1"], "--kv-cache", kv, "--head", head, "--temperature", 0, "--max-new-tokens", 5,
                      stdin="hello there\nand a follow-up\n/image x.png\n/reset\nsecond question\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("TORCH False")
    assert result.stdout.count("tok/s") == 3 and "cannot read images" in result.stdout
    cached = [int(n) for n in re.findall(r", (\d+) cached\)", result.stdout)]
    assert cached[1] > 5  # the follow-up reused turn one
    # /reset keeps the shared prefix (int4: from a block boundary, the key tail holding the last block only)
    assert cached[2] > 0 if kv != "int4" else cached[2] % 32 == 0


@pytest.mark.parametrize("args, fragment", [(("--runtime", "lean", "--dtype", "float32"), "--dtype needs the PyTorch"),
                                            (("--runtime", "lean", "--prompt-cache", "x.kv"), "--prompt-cache needs"),
                                            (("--head", "int4", "--dtype", "float32"), "--head int4 (lean runtime only)"),
                                            (("--runtime", "torch", "--head", "int4"), "--head int4 runs on the lean"),
                                            (("--runtime", "torch", "--kv-cache", "f16"),
                                             "--kv-cache f16 runs on the lean"),
                                            (("--kv-cache", "f16", "--dtype", "float32"),
                                             "--kv-cache f16 (lean runtime only)")])
def test_lean_runtime_refusals_are_clean_errors(files, args, fragment):
    result = run_chat(files["Q4_1"], *args, stdin="/exit\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert fragment in result.stderr


def test_other_options_fall_back_to_pytorch(files):
    result = run_chat(files["Q4_1"], "--dtype", "float32", "--temperature", 0, "--max-new-tokens", 3,
                      stdin="hello\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("TORCH True") and "tok/s" in result.stdout


def test_cli_head_choices_are_the_runtimes():
    """minicpm chat's --head names what lean.load takes (the parser spells them out: no numpy at --help)."""
    from minicpm.cli.main import build_parser

    chat = next(a for a in build_parser()._subparsers._group_actions[0].choices["chat"]._actions if a.dest == "head")
    assert tuple(chat.choices) == lean_model.HEADS and chat.default == lean_model.HEADS[0]
