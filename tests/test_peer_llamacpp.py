"""Parity with llama.cpp (through llama-cpp-python), the reference runtime for GGUF files.

(a) The real SmolLM2 GGUF (Q4_1): the same greedy tokens from llama.cpp and from
    `minicpm.load(path)` + `model.generate`, for the same prompt ids. llama.cpp multiplies Q4_1
    weights with 8-bit-quantized activations and we use float32 ones, so logits differ by ~2 %
    of their range and a near-tie can flip; the prompt below has clear margins at every step.
    The same model re-exported by `write_gguf` as f32 removes that difference: then 16 greedy
    tokens must agree on any prompt and the logits to 1e-3.
(b) Tiny random MiniCPM-architecture files written by `write_gguf` (every muP scaling on; GQA,
    untied and MoE variants): llama.cpp, run with an f32 KV cache and no flash attention, gives
    the logits we compute from `load_gguf` of the same file.
(c) The tiny checkpoints recorded with the official MiniCPM code (tests/fixtures/official),
    exported by `write_gguf`: llama.cpp reproduces the official logits and greedy tokens,
    without our model in the loop.

Run with `make test-peer` (or `pytest -m peer` after `scripts/build_llama_cpp.sh .venv`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from test_gguf import (CONFIGS, OFFICIAL_GGUF_VARIANTS, official_checkpoint, smollm2_path,
                       tiny_spm_metadata, write_tiny)

pytestmark = pytest.mark.peer
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (scripts/build_llama_cpp.sh .venv)")

GGML_TYPE_F32 = 0
NEW_TOKENS = 16
PROMPT = "<|im_start|>user\nList three colors.<|im_end|>\n<|im_start|>assistant\n"
OPEN_PROMPT = ("<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n"
               "<|im_start|>assistant\n")


def open_llama(path, n_ctx: int = 256):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_batch=n_ctx,
                           logits_all=True, flash_attn=False, type_k=GGML_TYPE_F32,
                           type_v=GGML_TYPE_F32, seed=0, verbose=False)


def llama_greedy(llm, ids: list[int], n: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """Greedy decoding on llama.cpp's own logits (argmax = temperature 0), with the margin
    between its two best logits at every step."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    margins: list[float] = []
    while len(out) < n:
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        second, first = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        out.append(token)
        margins.append(float(first - second))
        if token in stop:
            break
        llm.eval([token])
    return out, margins


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
    theirs, margins = llama_greedy(llm, ids, NEW_TOKENS, set(model.config.eos_token_ids))
    llama_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, temperature=0)[0].tolist()
    ours_s = time.perf_counter() - start

    print(f"\nllama.cpp: {theirs} ({llama_s:.2f} s)\nminicpm:   {ours} ({ours_s:.2f} s, "
          f"load {load_s:.1f} s)\ntext: {llm.detokenize(theirs).decode(errors='replace')!r}")
    assert ours == theirs, f"llama.cpp top-2 margins per step: {np.round(margins, 3).tolist()}"


def test_smollm2_prompt_logits_close_to_llama_cpp(smollm2):
    path, model, _tokenizer, _ = smollm2
    llm = open_llama(path)
    ids = llm.tokenize(OPEN_PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    ours = model(torch.tensor([ids]))[0].numpy()
    diff = np.abs(ours - theirs).max()
    print(f"\nQ4_1 file: max |logit diff| {diff:.4f} of max |logit| {np.abs(theirs).max():.2f}")
    assert diff < 0.05 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_smollm2_reexported_as_f32_matches_exactly(smollm2, tmp_path):
    """write_gguf on a real Llama-architecture model (GQA 9/3, gpt2 tokenizer), run by llama.cpp."""
    from minicpm.formats.gguf import read_gguf, write_gguf

    path, model, _tokenizer, _ = smollm2
    config, tensors, metadata = read_gguf(path)
    tokenizer_meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    start = time.perf_counter()
    exported = write_gguf(config, tensors, tokenizer_meta, tmp_path / "smollm2-f32.gguf", "f32")
    write_s = time.perf_counter() - start
    llm = open_llama(exported)
    ids = llm.tokenize(OPEN_PROMPT.encode(), add_bos=False, special=True)

    llm.eval(ids)
    theirs_logits = np.array(llm.scores[: len(ids)])
    diff = np.abs(model(torch.tensor([ids]))[0].numpy() - theirs_logits).max()
    theirs, margins = llama_greedy(llm, ids, NEW_TOKENS, set())
    ours = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, temperature=0)[0].tolist()
    print(f"\nf32 export (written in {write_s:.1f} s): max |logit diff| {diff:.2e}\n"
          f"llama.cpp: {theirs}\nminicpm:   {ours}")
    assert diff < 1e-3
    assert ours == theirs[: len(ours)] and len(ours) == NEW_TOKENS, margins


def test_smollm2_tokenizer_matches_llama_cpp(smollm2):
    path, _model, tokenizer, _ = smollm2
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (PROMPT, OPEN_PROMPT, "Hello, world! 1234 naïve café\n\n  spaces"):
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


@pytest.mark.parametrize("variant", OFFICIAL_GGUF_VARIANTS)
def test_llama_cpp_reproduces_official_minicpm(tmp_path, variant):
    from minicpm.formats.gguf import write_gguf

    config, state, reference = official_checkpoint(variant)
    path = write_gguf(config, state.items(), tiny_spm_metadata(config.vocab_size),
                      tmp_path / f"{variant}.gguf", file_type="f32")
    llm = open_llama(path, n_ctx=64)
    worst = 0.0
    for row, expected in zip(reference["input_ids"].tolist(), reference["logits"].numpy()):
        llm.reset()
        llm.eval(row)
        worst = max(worst, float(np.abs(np.array(llm.scores[: len(row)]) - expected).max()))
    prompt = reference["prompt_ids"][0].tolist()
    greedy, _margins = llama_greedy(llm, prompt, reference["greedy_ids"].shape[1], set())
    print(f"\nofficial {variant}: max |logit diff| {worst:.2e}")
    assert worst <= 1e-4
    assert greedy == reference["greedy_ids"][0].tolist()
