"""A prompt cache saved to disk and loaded back (generation/saved_cache.py, `minicpm chat
--context-file --prompt-cache`): the same tokens as a fresh prefill, only the new part run, and
every file that does not belong to this model and cache kind refused with the reason."""

import re

import pytest
import torch
from conftest import preset, random_model
from test_cli import assert_clean_error, run

from minicpm.errors import MiniCPMError
from minicpm.generation.generate import PromptCache, TokenGenerator
from minicpm.generation.sampling import SamplingParams
from minicpm.generation.saved_cache import load_prompt_cache, save_prompt_cache

DOCUMENT = list(range(40, 140))   # 100 token ids
QUESTION = [7, 8, 9, 10, 11]


def greedy(model, prompt, prompt_cache=None):
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=8, stop_token_ids=[])
    generator = TokenGenerator(model, [prompt], params, prompt_cache=prompt_cache)
    tokens = [step[0] for step in generator]
    return tokens, generator.reused_tokens


@pytest.fixture(scope="module")
def model():
    return random_model(preset("tiny"), seed=0)


@pytest.mark.parametrize("kind", ["auto", "int8", "int4"])
def test_saved_document_continues_as_a_fresh_prefill(model, tmp_path, kind):
    model.kv_cache_dtype = kind
    try:
        primed = PromptCache()
        assert primed.prefill(model, DOCUMENT) == len(DOCUMENT)
        assert primed.prefill(model, DOCUMENT) == 0  # already there
        path = tmp_path / "doc.kv"
        assert save_prompt_cache(primed, model, path) == len(DOCUMENT)
        loaded = load_prompt_cache(model, path)
        assert loaded.ids == DOCUMENT and loaded.cache.length == len(DOCUMENT)
        tokens, reused = greedy(model, DOCUMENT + QUESTION, loaded)
        assert reused == len(DOCUMENT)  # only the question was run
        # the same coded cache built in one process: the same tokens
        assert tokens == greedy(model, DOCUMENT + QUESTION, primed)[0]
        if kind == "auto":  # and a fresh prefill of the whole prompt
            assert tokens == greedy(model, DOCUMENT + QUESTION)[0]
    finally:
        model.kv_cache_dtype = "auto"


def test_int4_cache_rewinds_to_a_key_block(model):
    """A new prompt that leaves the cached one mid-block of an earlier block of 32 keys resumes
    at that block's start (its fp32 keys are gone); within the newest block, where it left."""
    model.kv_cache_dtype = "int4"
    try:
        primed = PromptCache()
        primed.prefill(model, DOCUMENT)  # 100 tokens: the newest block holds positions 96..99
        _, reused = greedy(model, DOCUMENT[:50] + QUESTION, primed)
        assert reused == 32
        primed.prefill(model, DOCUMENT)
        _, reused = greedy(model, DOCUMENT[:98] + QUESTION, primed)
        assert reused == 98
    finally:
        model.kv_cache_dtype = "auto"


def test_foreign_or_mismatched_files_are_refused(model, tmp_path):
    primed = PromptCache()
    primed.prefill(model, DOCUMENT)
    path = tmp_path / "doc.kv"
    save_prompt_cache(primed, model, path)
    other = random_model(preset("tiny"), seed=1)  # same shape, other weights
    with pytest.raises(MiniCPMError, match="another model"):
        load_prompt_cache(other, path)
    model.kv_cache_dtype = "int8"
    try:
        with pytest.raises(MiniCPMError, match="holds a auto KV cache; run with --kv-cache auto"):
            load_prompt_cache(model, path)
    finally:
        model.kv_cache_dtype = "auto"
    with pytest.raises(MiniCPMError, match="saved with the model in float32"):
        load_prompt_cache(random_model(preset("tiny"), seed=0, dtype=torch.bfloat16), path)
    truncated = tmp_path / "truncated.kv"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MiniCPMError, match="cannot read the prompt cache"):
        load_prompt_cache(model, truncated)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(MiniCPMError, match="is not a minicpm prompt cache"):
        load_prompt_cache(model, tmp_path / "weights.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "old.kv"), metadata={"format": "minicpm-prompt-cache/1"})
    with pytest.raises(MiniCPMError, match="another version of minicpm .*delete it"):
        load_prompt_cache(model, tmp_path / "old.kv")
    with pytest.raises(MiniCPMError, match="empty"):
        save_prompt_cache(PromptCache(), model, tmp_path / "empty.kv")
    assert not (tmp_path / "empty.kv").exists()


def test_chat_context_file_is_prefilled_once_and_loaded_next_time(tiny_checkpoint, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("The museum opens at nine. " * 8)
    cache = tmp_path / "doc.kv"
    args = ("chat", tiny_checkpoint, "--context-file", document, "--prompt-cache", cache,
            "--temperature", 0, "--max-new-tokens", 4)
    questions = "when does it open?\n/reset\nand closes?\n/exit\n"
    first = run(*args, stdin=questions)
    assert first.returncode == 0, first.stderr
    primed = int(re.search(r"context: (\d+) tokens prefilled", first.stderr).group(1))
    assert primed > 50 and cache.exists()
    cached = [int(n) for n in re.findall(r", (\d+) cached\)", first.stdout)]
    assert cached == [primed, primed]  # the document, also after /reset
    second = run(*args, stdin=questions)
    assert second.returncode == 0, second.stderr
    assert "tokens loaded from" in second.stderr and "context: 0 tokens prefilled" in second.stderr
    assert [int(n) for n in re.findall(r", (\d+) cached\)", second.stdout)] == cached
    replies = [line for line in first.stdout.splitlines() if not line.startswith(("[", ">>>", "commands"))]
    assert replies == [line for line in second.stdout.splitlines()
                       if not line.startswith(("[", ">>>", "commands"))]
    # a cache of another kind is refused before the chat starts, nothing overwritten
    before = cache.read_bytes()
    assert_clean_error(run(*args, "--kv-cache", "int8", stdin="/exit\n"), "--kv-cache auto")
    assert cache.read_bytes() == before
    assert_clean_error(run("chat", tiny_checkpoint, "--context-file", tmp_path / "missing.txt", stdin="/exit\n"),
                       "missing.txt")
    # a path that could not be saved to is refused before the chat starts, not after it
    assert_clean_error(run("chat", tiny_checkpoint, "--prompt-cache", tmp_path / "no" / "such" / "dir.kv",
                           stdin="hello\n/exit\n"), "does not exist")
    assert_clean_error(run("chat", tiny_checkpoint, "--prompt-cache", tmp_path, stdin="hello\n/exit\n"),
                       "is a directory")
