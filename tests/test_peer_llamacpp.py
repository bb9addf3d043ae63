"""Parity with llama.cpp (through llama-cpp-python), the reference runtime for GGUF files.

(a) The real SmolLM2 GGUF (Q4_1): the same greedy tokens from llama.cpp and from
    `minicpm.load(path)` + `model.generate`, for the same prompt ids.
(b) Tiny random MiniCPM-architecture files written by `write_gguf` (every muP scaling on; GQA,
    untied and MoE variants): llama.cpp, run with an f32 KV cache and no flash attention, gives
    the logits we compute from `load_gguf` of the same file.

Run with `make test-peer` (or `pytest -m peer` after `scripts/build_llama_cpp.sh .venv`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from test_gguf import CONFIGS, smollm2_path, write_tiny

pytestmark = pytest.mark.peer
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (scripts/build_llama_cpp.sh .venv)")

GGML_TYPE_F32 = 0
PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 16


def open_llama(path, n_ctx: int = 256):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_batch=n_ctx,
                           logits_all=True, flash_attn=False, type_k=GGML_TYPE_F32,
                           type_v=GGML_TYPE_F32, seed=0, verbose=False)


def llama_greedy(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy decoding on llama.cpp's own logits (argmax = temperature 0)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return out


@pytest.fixture(scope="module")
def smollm2():
    import minicpm

    path = smollm2_path()
    start = time.perf_counter()
    model, tokenizer = minicpm.load(str(path))
    load_s = time.perf_counter() - start
    return path, model, tokenizer, load_s


def test_smollm2_greedy_tokens_match_llama_cpp(smollm2):
    path, model, _tokenizer, load_s = smollm2
    llm = open_llama(path)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)

    start = time.perf_counter()
    theirs = llama_greedy(llm, ids, NEW_TOKENS, set(model.config.eos_token_ids))
    llama_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, temperature=0)[0].tolist()
    ours_s = time.perf_counter() - start

    print(f"\nllama.cpp: {theirs} ({llama_s:.2f} s)\nminicpm:   {ours} ({ours_s:.2f} s, "
          f"load {load_s:.1f} s)\ntext: {llm.detokenize(theirs).decode(errors='replace')!r}")
    assert ours == theirs


def test_smollm2_prompt_logits_close_to_llama_cpp(smollm2):
    """llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, we with float32 ones:
    logits differ by a few percent of their range, and the top token agrees."""
    path, model, _tokenizer, _ = smollm2
    llm = open_llama(path)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    ours = model(torch.tensor([ids]))[0].numpy()
    diff = np.abs(ours - theirs).max()
    print(f"\nmax |logit diff| {diff:.4f} of max |logit| {np.abs(theirs).max():.2f}")
    assert diff < 0.05 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_smollm2_tokenizer_matches_llama_cpp(smollm2):
    path, _model, tokenizer, _ = smollm2
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (PROMPT, "Hello, world! 1234 naïve café\n\n  spaces"):
        assert tokenizer.encode(text, add_special_tokens=False) == llm.tokenize(
            text.encode(), add_bos=False, special=True), text


# Allowed |logit difference| relative to the largest logit. With f32 weights llama.cpp does the
# same float32 arithmetic; with f16/bf16/quantized weights it also rounds the activations
# (to f16 or 8-bit blocks) before each matrix product, which we do not.
TOLERANCE = {"f32": 1e-4, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 2e-2}


@pytest.mark.parametrize("file_type", list(TOLERANCE))
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_tiny_minicpm_logits_match_llama_cpp(tmp_path, variant, file_type):
    from minicpm.formats.gguf import load_gguf

    if file_type != "f32" and variant not in ("tied", "moe"):
        pytest.skip("quantized types are checked on two variants")
    path, _ = write_tiny(tmp_path, CONFIGS[variant], file_type)
    model, _tokenizer = load_gguf(path)
    ids = [1, 5, 77, 300, 12, 260, 9, 44, 100, 3, 290, 17]
    ours = model(torch.tensor([ids]))[0].numpy()

    llm = open_llama(path, n_ctx=64)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    diff = np.abs(ours - theirs).max()
    scale = np.abs(theirs).max()
    print(f"\n{variant} {file_type}: max |logit diff| {diff:.2e}, max |logit| {scale:.2f}")
    if file_type == "f32":
        assert diff <= TOLERANCE["f32"]
    else:
        assert diff <= TOLERANCE[file_type] * scale
