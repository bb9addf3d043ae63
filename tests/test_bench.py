"""The benchmark's machinery, not its numbers: preparation writes checkpoints every engine can load,
and the table is assembled from results. No timings are asserted here."""

from __future__ import annotations

import pytest
import torch

from minicpm.bench import cases, checkpoints, process, report


def test_prepare_writes_loadable_checkpoints(tmp_path):
    from minicpm.formats.gguf import load_gguf
    from minicpm.formats.hf import load_model

    assert not checkpoints.prepared(tmp_path)
    checkpoints.prepare("tiny", tmp_path, log=lambda message: None)
    assert checkpoints.prepared(tmp_path)  # a kept bench directory is reused as it is
    ours = load_model(tmp_path / "hf")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    # the tiny shape is widened to the tokenizer's vocabulary and the benchmark's context
    assert ours.config.vocab_size >= 49152
    assert ours.config.max_position_embeddings >= cases.PROMPT_TOKENS + cases.NEW_TOKENS
    ids = torch.tensor([cases.prompt_ids(ours.config.vocab_size, 8)])
    reference = ours(ids).float()
    for gguf_type in ("f16", "q8_0", "q4_0"):
        model, tokenizer = load_gguf(tmp_path / f"model-{gguf_type}.gguf", dtype="float32")
        assert tokenizer is not None and model.config.vocab_size == ours.config.vocab_size
        assert torch.isfinite(model(ids)).all()
    f16, _ = load_gguf(tmp_path / "model-f16.gguf", dtype="float32")
    torch.testing.assert_close(f16(ids), reference, atol=2e-2, rtol=2e-2)
    for precision, (bits, head) in cases.QUANTIZED.items():  # written once, by the streaming quantizer
        quantized = load_model(checkpoints.ours_path(tmp_path, precision))
        assert (quantized.config.quantization["bits"], quantized.config.quantization["head"]) == (bits, head)
        assert quantized.config.quantization["embedding"] == "head"  # tied: one quantized table
        assert torch.isfinite(quantized(ids)).all()


def test_prepare_llama_format_loads_in_transformers(tmp_path):
    import transformers

    checkpoints.prepare("tiny", tmp_path, gguf_types=(), quantized=(), log=lambda message: None)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 3


def test_random_tensors_are_bf16_and_seeded():
    from minicpm.config import preset

    first = dict(checkpoints.random_tensors(preset("tiny")))
    again = dict(checkpoints.random_tensors(preset("tiny")))
    assert all(t.dtype == torch.bfloat16 for t in first.values())
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert "lm_head.weight" not in first  # tied: stored once


def test_table_ratios_and_skipped_rows():
    result = {"load": 1.0, "ttft": 2.0, "prefill": 256.0, "decode": 4.0, "weight_bytes": 2e9, "rss": 3000.0}
    peer = {**result, "prefill": 128.0, "decode": 2.0}
    rows = [("ours", "bf16", result), ("ours", "int4", "not installed"), ("llama.cpp", "f16", peer)]
    text = report.table("tiny", rows, bandwidth=20.0)
    assert "| ours | bf16 | 1.0 | 2.00 | 256.0 | 4.00 | 2.00 | 40% of 10.0 | 3000 | 2.00x | 2.00x |" in text
    assert "| ours | int4 | not run: not installed |" in text


def test_ratios_prefer_llama_bench_to_llama_cpp_python():
    """Where llama.cpp's own llama-bench ran on the file, ratios are to it (no load time: '-')."""
    result = {"load": 1.0, "ttft": 2.0, "prefill": 256.0, "decode": 4.0, "weight_bytes": 2e9, "rss": 3000.0}
    python_peer = {**result, "prefill": 128.0, "decode": 2.0}
    bench_peer = {**result, "load": None, "prefill": 200.0, "decode": 3.2}
    rows = [("ours", "int4", result), ("llama.cpp", "q4_0", python_peer), ("llama-bench", "q4_0", bench_peer)]
    text = report.table("tiny", rows, bandwidth=20.0)
    assert "| ours | int4 | 1.0 | 2.00 | 256.0 | 4.00 | 2.00 | 40% of 10.0 | 3000 | 1.28x | 1.25x |" in text
    assert "| llama-bench | q4_0 | - | 2.00 | 200.0 |" in text
    assert ("llama-bench", "q4_0") in cases.CASES and "llama-bench" in cases.PEER_ENGINES


@pytest.mark.peer
def test_llama_bench_case_runs_the_gguf(tmp_path):
    """llama.cpp's own llama-bench (built once by scripts/build_llama_tools.sh) on the tiny shape's
    q4_0 file: both rates, its own peak RSS, the file's bytes."""
    checkpoints.prepare("tiny", tmp_path, gguf_types=("q4_0",), quantized=(), log=lambda message: None)
    row = process.run_case("llama-bench", "q4_0", tmp_path, threads=1, timeout=1800)
    assert isinstance(row, dict), row
    assert row["prefill"] > 0 and row["decode"] > 0 and row["load"] is None
    assert row["rss"] > 5 and 0 < row["weight_bytes"] < (tmp_path / "model-q4_0.gguf").stat().st_size


def test_ours_cases_load_the_prepared_quantized_checkpoint(tmp_path):
    """Both child-process entry points run on the tiny shape: speed, and the 2k-context memory case."""
    checkpoints.prepare("tiny", tmp_path, gguf_types=(), quantized=("int4",),
                        log=lambda message: None)
    speed = process.run_case("ours", "int4", tmp_path, threads=1, timeout=300)
    assert isinstance(speed, dict), speed
    assert speed["new_tokens"] == cases.NEW_TOKENS and speed["rss"] > 0 and speed["weight_bytes"] > 0
    ctx = process.run_case("ours", "int4", tmp_path, threads=1, timeout=300, mode="ctx")
    assert isinstance(ctx, dict), ctx
    assert ctx["new_tokens"] == cases.CTX_NEW and ctx["context"] == cases.CTX and ctx["kv"] == "int8"
    assert cases.CTX_PROMPT + cases.CTX_NEW == cases.CTX
    ctx4 = process.run_case("ours", "int4" + cases.INT4_KV4, tmp_path, threads=1, timeout=300, mode="ctx")
    assert isinstance(ctx4, dict), ctx4
    assert ctx4["kv"] == "int4" and ctx4["new_tokens"] == cases.CTX_NEW


def test_lean_cases_run_the_q4_0_file_without_torch(tmp_path):
    checkpoints.prepare("tiny", tmp_path, gguf_types=("q4_0",), quantized=(), log=lambda message: None)
    for precision, kv in ((cases.GGUF_Q4_0, "f16"), (cases.GGUF_Q4_0 + cases.FP32_KV, "fp32")):
        assert ("lean", precision) in cases.CASES and cases.PEER[precision] == "q4_0"
        speed = process.run_case("lean", precision, tmp_path, threads=1, timeout=300)
        assert isinstance(speed, dict), speed
        assert speed["new_tokens"] == cases.NEW_TOKENS and speed["weight_bytes"] > 0 and not speed["torch_imported"]
        assert speed["kv"] == kv
    for precision, kv in ((cases.GGUF_Q4_0, "int8"), (cases.GGUF_Q4_0 + cases.INT4_KV4, "int4"),
                          (cases.GGUF_Q4_0 + cases.HEAD4 + cases.INT4_KV4, "int4")):
        assert ("lean", precision) in cases.MEMORY_CASES
        ctx = process.run_case("lean", precision, tmp_path, threads=1, timeout=300, mode="ctx")
        assert isinstance(ctx, dict), ctx
        assert ctx["kv"] == kv and ctx["new_tokens"] == cases.CTX_NEW and not ctx["torch_imported"]


def test_memory_table():
    ours = {"load": 1.5, "ttft": 10.0, "prefill": 201.6, "decode": 3.0, "new_tokens": 32, "kv": "int8",
            "context": 2048, "rss": 1900.0}
    text = report.memory_table("minicpm-2b", [("ours", "int4", ours), ("llama.cpp", "q4_0", "not installed")])
    assert "| ours | int4 | int8 | 1.5 | 201.6 | 3.00 | 1900 |" in text
    assert "| llama.cpp | q4_0 | not run: not installed |" in text
    assert "2048-token context" in text


def test_cli_parses_bench():
    from minicpm.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--full", "--threads", "1", "--preset", "tiny"])
    assert (args.verb, args.full, args.threads, args.preset) == ("bench", True, 1, "tiny")


def test_bench_refuses_zero_threads_before_doing_any_work():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "minicpm.cli.main", "bench", "--threads", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "threads must be >= 1, got 0" in result.stderr


def test_layer_shared_tensors_hold_one_layer_and_name_every_tensor():
    from minicpm.config import preset
    from minicpm.formats.hf import checkpoint_state_dict
    from minicpm.model import MiniCPMForCausalLM

    config = preset("tiny-gqa", num_experts=4, num_experts_per_tok=2)
    tensors = dict(checkpoints.layer_shared_tensors(config))
    with torch.device("meta"):
        expected = {n: t.shape for n, t in checkpoint_state_dict(MiniCPMForCausalLM(config)).items()}
    assert {n: t.shape for n, t in tensors.items()} == expected
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16
        if name.startswith("model.layers.1."):  # the very object of layer 0: one layer held
            assert tensor is tensors[name.replace("layers.1.", "layers.0.", 1)]
    again = dict(checkpoints.layer_shared_tensors(config))
    assert all(torch.equal(tensors[n], again[n]) for n in tensors)  # seeded
    experts = [tensors[f"model.layers.0.mlp.experts.{e}.w1.weight"] for e in range(4)]
    assert not torch.equal(experts[0], experts[1])  # experts within a layer differ
    assert 0.8 < tensors["model.norm.weight"].float().mean() < 1.2


def test_prepare_layer_shared_writes_every_layer_in_full(tmp_path):
    from minicpm.config import preset
    from minicpm.formats.gguf.container import GGUFFile
    from minicpm.formats.hf import load_model

    config = preset("tiny-gqa", num_experts=4, num_experts_per_tok=2, vocab_size=49152, torch_dtype="bfloat16")
    checkpoints.prepare_layer_shared(config, tmp_path, log=lambda message: None)
    model = load_model(checkpoints.ours_path(tmp_path, "int4"))
    assert model.config.quantization["bits"] == 4 and model.config.num_experts == 4
    first, second = (model.model.layers[i].mlp.experts[2].w2.qweight for i in (0, 1))
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()  # equal, stored twice
    names = {t.name for t in GGUFFile(tmp_path / "model-q4_0.gguf").tensors}
    assert {f"blk.{i}.ffn_down_exps.weight" for i in range(config.num_hidden_layers)} <= names
    ids = torch.tensor([cases.prompt_ids(config.vocab_size, 8)])
    assert torch.isfinite(model(ids)).all()
