"""The `minicpm` command, run as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import random_model, variant_config

from minicpm.formats.hf import load_model, save_pretrained

CLI = [sys.executable, "-m", "minicpm.cli.main"]


def run(*args, stdin: str | None = None, timeout: float = 120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*CLI, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_clean_error(result, *fragments: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_is_instant_and_imports_no_torch():
    result = run("--help")
    assert result.returncode == 0 and "chat" in result.stdout and "convert" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, minicpm.cli.main; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"


def test_kv_cache_choices_are_the_cache_kinds():
    from minicpm.cache import KV_CACHE_DTYPES
    from minicpm.cli.options import KV_CACHE_CHOICES

    assert KV_CACHE_CHOICES == KV_CACHE_DTYPES


def test_generate_with_an_int4_kv_cache(tiny_checkpoint):
    from minicpm import load

    model, tokenizer = load(str(tiny_checkpoint))
    model.kv_cache_dtype = "int4"
    ids = tokenizer.encode("The capital of France is")
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6), skip_special_tokens=True)
    result = run("generate", tiny_checkpoint, "--prompt", "The capital of France is", "--raw",
                 "--max-new-tokens", 6, "--kv-cache", "int4", "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert expected.strip() and expected.strip() in result.stdout


def test_the_default_model_has_names(tiny_checkpoint, monkeypatch):
    from minicpm.loading import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME

    for name in ("default", DEFAULT_MODEL_NAME):  # as `minicpm serve` names it to clients
        result = run("info", name)
        assert result.returncode == 0 and DEFAULT_MODEL_FILE in result.stdout, result.stderr
    # a checkpoint folder of that name, where the command runs, is what it means there
    monkeypatch.chdir(tiny_checkpoint.parent)
    tiny_checkpoint.rename(tiny_checkpoint.parent / "default")
    result = run("info", "default")
    assert result.returncode == 0 and "MiniCPMForCausalLM" in result.stdout, result.stderr


def test_info_reports_the_architecture(tiny_checkpoint):
    result = run("info", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    config = load_model(tiny_checkpoint).config
    assert "MiniCPMForCausalLM" in result.stdout
    assert "embedding x12, residual x0.80829" in result.stdout  # 1.4 / sqrt(3)
    assert "logits /4" in result.stdout  # 64 / 16
    assert f"{config.num_parameters() / 1e6:.1f} M" in result.stdout
    assert "float32" in result.stdout


def test_generate_matches_the_library(tiny_checkpoint, tmp_path):
    from minicpm import load

    model, tokenizer = load(str(tiny_checkpoint))
    prompts = ["The capital of France is", "天气"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "out.jsonl"
    result = run("generate", tiny_checkpoint, "--prompt-file", file, "--raw", "--max-new-tokens", 6,
                 "--output", out, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        new = model.generate(tokenizer.encode(record["prompt"]), max_new_tokens=6)
        new = [t for t in new if t not in (tokenizer.eos_token_id,)]
        assert record["response"] == tokenizer.decode(new, skip_special_tokens=True)


def test_chat_session_through_stdin(tiny_checkpoint):
    result = run("chat", tiny_checkpoint, "--temperature", 0, "--max-new-tokens", 5,
                 stdin="hello there\nand a follow-up\n/reset\nsecond question\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("tok/s") == 3 and result.stdout.count("first token in") == 3
    assert "(conversation cleared)" in result.stdout
    cached = [int(n) for n in re.findall(r", (\d+) cached\)", result.stdout)]
    assert cached[0] == 0 and cached[1] > 5 and cached[2] == 0  # the follow-up reused turn one


def test_convert_to_llama_and_back(tiny_checkpoint, tmp_path):
    original = load_model(tiny_checkpoint)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    result = run("convert", tiny_checkpoint, tmp_path / "llama", "--to", "llama")
    assert result.returncode == 0, result.stderr
    llama = load_model(tmp_path / "llama")
    assert llama.config.model_type == "llama" and not llama.config.has_mup_scaling
    torch.testing.assert_close(llama(ids), original(ids), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "llama" / "tokenizer_config.json").exists()
    result = run("convert", tmp_path / "llama", tmp_path / "hf", "--to", "hf")
    assert result.returncode == 0, result.stderr
    back = load_model(tmp_path / "hf")
    assert back.config.model_type == "minicpm"
    torch.testing.assert_close(back(ids), original(ids), rtol=1e-5, atol=1e-5)


def test_convert_refuses_to_overwrite(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    result = run("convert", tiny_checkpoint, tmp_path / "out", "--to", "hf")
    assert_clean_error(result, "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("args, fragment", [
    (["info", "/no/such/model"], "no such file or directory"),
    (["chat", "/no/such/model.gguf"], "no such file or directory"),
    (["generate", "--prompt", "hi", "--temperature", "-1", "{ckpt}"], "temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "2", "{ckpt}"], "top_p must be in (0, 1]"),
    (["generate", "--prompt-file", "/no/such/prompts.txt", "{ckpt}"], "cannot read prompt file"),
    (["info", "{bad_config}"], "missing required field"),
    (["convert", "{ckpt}", "{tmp}/x", "--to", "gguf", "--type", "q3_weird"], "q3_weird"),
    (["generate", "--prompt", "hi", "--output", "/no/such/dir/out.jsonl", "{ckpt}"], "/no/such/dir/out.jsonl"),
])
def test_bad_input_is_one_clear_line(args, fragment, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "minicpm", "vocab_size": 5}))
    args = [a.format(ckpt=tiny_checkpoint, bad_config=bad, tmp=tmp_path) for a in args]
    assert_clean_error(run(*args), fragment)


def test_hub_id_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = subprocess.run([*CLI, "info", "openbmb/MiniCPM-2B-sft-bf16"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert_clean_error(result, "openbmb/MiniCPM-2B-sft-bf16", "local")


def test_saved_checkpoint_runs_in_the_cli(tmp_path, spm_tokenizer_dir):
    """A MoE checkpoint saved by the library is usable by every verb."""
    from minicpm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(spm_tokenizer_dir)
    model = random_model(variant_config("moe", vocab_size=tokenizer.vocab_size, max_position_embeddings=256))
    path = save_pretrained(model, tokenizer, tmp_path / "moe")
    assert run("info", path).returncode == 0
    result = run("generate", path, "--prompt", "hi", "--max-new-tokens", 3)
    assert result.returncode == 0, result.stderr


def test_convert_quantized_gguf_and_quantized_checkpoint(tmp_path, tiny_checkpoint):
    """A GGUF file's quantized blocks are dequantized for the float writers; our own quantized
    checkpoint is refused by them with a clear error."""
    gguf = tmp_path / "m.gguf"
    assert run("convert", tiny_checkpoint, gguf, "--to", "gguf", "--type", "q4_0").returncode == 0
    result = run("convert", gguf, tmp_path / "llama", "--to", "llama")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "llama" / "config.json").exists()
    assert run("quantize", tiny_checkpoint, tmp_path / "q4").returncode == 0
    result = run("convert", tmp_path / "q4", tmp_path / "again.gguf", "--to", "gguf")
    assert_clean_error(result, "is quantized")


# --- images (MiniCPM-V) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v_checkpoint(tmp_path_factory):
    """A tiny MiniCPM-V with a tokenizer, and a 300x200 photo that reads as 7 slices."""
    from tests.conftest import pattern, save_tiny_v_checkpoint

    root = tmp_path_factory.mktemp("vcli")
    pattern(300, 200).save(root / "photo.png")
    (root / "notes.jpg").write_text("not a picture")
    return save_tiny_v_checkpoint(root), root / "photo.png"


def test_generate_with_an_image_matches_the_library(v_checkpoint):
    from PIL import Image

    from minicpm import load
    from minicpm.vision.chat import stream_chat

    path, photo = v_checkpoint
    result = run("generate", path, "--image", photo, "--prompt", "What is this?", "--prompt", "And this?",
                 "--max-new-tokens", 8)
    assert result.returncode == 0, result.stderr
    assert "encoding image" in result.stderr and "7/7" in result.stderr  # the progress over the slices
    model, tokenizer = load(str(path))
    for prompt in ("What is this?", "And this?"):
        reply = "".join(stream_chat(model, tokenizer, Image.open(photo), [{"role": "user", "content": prompt}],
                                    temperature=0, max_new_tokens=8)).strip()
        assert f"### {prompt}\n{reply}\n" in result.stdout


def test_chat_with_an_image_and_the_image_command(v_checkpoint):
    path, photo = v_checkpoint
    script = (f"describe it\nand the colours?\n/image {photo.parent / 'notes.jpg'}\nstill here\n"
              f"/image\nno picture now\n/image {photo}\nagain\n/exit\n")
    result = run("chat", path, "--image", photo, "--max-new-tokens", 4, "--seed", 0, stdin=script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.count("tok/s") == 5
    # the follow-up reused the image's prompt; the bad file changed nothing; no image: a short prompt
    prompts = [(int(a), int(b)) for a, b in re.findall(r"prompt (\d+) tokens, (\d+) cached", result.stdout)]
    assert prompts[1][1] > 7 * 16 and prompts[2][1] > 7 * 16
    assert prompts[3][0] < 7 * 16 < prompts[4][0]
    assert "error: " in result.stdout and "notes.jpg is not an image" in result.stdout
    assert "(image photo.png, 300x200, read as 7 slices; new conversation)" in result.stdout
    assert result.stderr.count("encoding image:   0%") == 2  # once per image, not per turn


def test_image_bad_input_is_one_clear_line(v_checkpoint, tiny_checkpoint, tmp_path):
    path, photo = v_checkpoint
    notes = photo.parent / "notes.jpg"
    assert_clean_error(run("chat", tiny_checkpoint, "--image", photo, stdin="hi\n"), "text-only model")
    assert_clean_error(run("generate", tiny_checkpoint, "--image", photo, "--prompt", "hi"), "text-only model")
    assert_clean_error(run("generate", path, "--image", notes, "--prompt", "hi"), "notes.jpg is not an image")
    assert_clean_error(run("chat", path, "--image", tmp_path / "gone.png"), "not found")
    assert_clean_error(run("generate", path, "--image", photo, "--prompt", "hi", "--raw"), "--raw")
    assert_clean_error(run("chat", path, "--system", "be brief"), "no system message")
    # a text model's chat says so for /image and goes on
    result = run("chat", tiny_checkpoint, "--max-new-tokens", 2, stdin=f"/image {photo}\nhello\n")
    assert result.returncode == 0 and "error: this is a text-only model" in result.stdout
    assert result.stdout.count("tok/s") == 1
