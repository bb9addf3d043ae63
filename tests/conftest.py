"""Shared fixtures: tiny seeded models of every variant of the family, written as real checkpoints.

Every variant keeps the muP scalings switched on (scale_emb != 1, dim_model_base != hidden_size,
scale_depth != 1) so that a forgotten scaling cannot hide behind a neutral value.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import minicpm.generation.methods  # noqa: F401  models built here get generate()/chat(), as minicpm.load's do
from minicpm.config import MiniCPMConfig, preset

pytest_plugins = ["tests.server_process"]  # the server tests' fixtures
torch.set_num_threads(min(2, os.cpu_count() or 1))
FIXTURES = Path(__file__).parent / "fixtures"

VARIANTS: dict[str, dict] = {
    # MiniCPM-2B-like: multi-head attention, tied head
    "2b": dict(),
    # MiniCPM-1B-like: grouped-query attention, more layers
    "1b": dict(num_key_value_heads=2, num_hidden_layers=4),
    # MiniCPM-2B-128k-like: untied head, dynamic NTK rope, larger vocab
    "128k": dict(tie_word_embeddings=False, vocab_size=352, max_position_embeddings=32,
                 rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 4.0}),
    # MiniCPM-MoE-8x2B-like
    "moe": dict(num_experts=4, num_experts_per_tok=2),
    # MiniCPM-S-like: FATReLU gate activation
    "s": dict(num_key_value_heads=2, hidden_act="fatrelu", hidden_act_param=0.05),
    # Llama-architecture checkpoint: neutral scalings, untied, linear rope scaling
    "llama": dict(model_type="llama", scale_emb=1.0, dim_model_base=None, scale_depth=None,
                  tie_word_embeddings=False, num_key_value_heads=2,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package), for tests of their pure parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_config(name: str, **overrides) -> MiniCPMConfig:
    return preset("tiny", **{**VARIANTS[name], **overrides})


def random_model(config: MiniCPMConfig, seed: int = 0, dtype=torch.float32):
    from minicpm.loading.assemble import random_model as build

    # std 0.3: large enough that logits differ by far more than float noise
    return build(config, seed=seed, dtype=dtype, std=0.3)


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def spm_tokenizer_dir() -> Path:
    return FIXTURES / "tokenizers" / "minicpm-spm"


def save_tiny_checkpoint(directory: Path, dtype=torch.bfloat16, context: int = 256) -> Path:
    """A tiny MiniCPM-2B-like checkpoint, saved as `directory`/tiny-minicpm, whose vocabulary
    matches the fixture tokenizer; bf16 by default, so that the native kernels serve it."""
    from minicpm.formats.hf import save_pretrained
    from minicpm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")
    config = variant_config("2b", vocab_size=tokenizer.vocab_size, max_position_embeddings=context)
    model = random_model(config, seed=3, dtype=dtype)
    return save_pretrained(model, tokenizer, directory / "tiny-minicpm")


def pattern(w: int, h: int):
    """The MiniCPM-V fixtures' test image: deterministic integer arithmetic (see fixtures/minicpmv/README)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (x * x * 7 + y * 13 + x * y * 5) % 256
    g = (x * 11 + y * y * 3 + (x ^ y) * 17) % 256
    b = ((x + 2 * y) * 29 + (x * y) // 7) % 256
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


# MiniCPM-V's added tokens, at the released ids
V_TOKENS = {101: "<image>", 102: "</image>", 103: "<ref>", 104: "</ref>", 105: "<box>", 106: "</box>",
            107: "<quad>", 108: "</quad>", 109: "<point>", 110: "</point>", 111: "<slice>", 112: "</slice>"}


def v_tokenizer(directory: Path):
    """The fixture SentencePiece tokenizer with MiniCPM-V's added tokens at their ids."""
    import json

    from minicpm.tokenizer import Tokenizer

    source = FIXTURES / "tokenizers" / "minicpm-spm"
    directory.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    for token_id, text in V_TOKENS.items():
        config["added_tokens_decoder"][str(token_id)] = {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    config["additional_special_tokens"] = list(V_TOKENS.values())
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return Tokenizer.from_pretrained(directory)


def save_tiny_v_checkpoint(directory: Path, dtype=torch.float32, seed: int = 5, **save) -> Path:
    """A seeded random tiny MiniCPM-V (the sizes of fixtures/minicpmv) with the fixture
    tokenizer's vocabulary and MiniCPM-V's added tokens, saved as `directory`/tiny-minicpmv."""
    import json

    from minicpm.formats.hf import save_pretrained
    from minicpm.vision import MiniCPMVConfig, random_minicpmv

    tokenizer = v_tokenizer(directory / "tokenizer")
    raw = json.loads((FIXTURES / "minicpmv" / "config.json").read_text())
    config = MiniCPMVConfig.from_hf({**raw, "vocab_size": tokenizer.vocab_size})
    return save_pretrained(random_minicpmv(config, seed=seed, dtype=dtype), tokenizer, directory / "tiny-minicpmv",
                           **save)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A saved tiny float32 checkpoint (see `save_tiny_checkpoint`)."""
    return save_tiny_checkpoint(tmp_path, dtype=torch.float32)
