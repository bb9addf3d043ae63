"""The pure parts of benchmarks/quantization.py (the quantization report): how weights are counted,
the "recovered" share, the targets read off a table, the doc's report markers, and the OS's peak RSS
of a timed command. No perplexity or timing of a model is asserted here."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import benchmark_script

from minicpm.config import MiniCPMConfig
from minicpm.formats.gguf.write import write_gguf
from minicpm.loading.assemble import random_model

report = benchmark_script("quantization")


def tiny() -> MiniCPMConfig:
    return MiniCPMConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


def test_weight_bytes_count_tensors_only_and_split_off_the_layers(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32, dtype=torch.bfloat16),
               "model.layers.0.mlp.up_proj.qweight": torch.zeros(64, 16, dtype=torch.uint8),
               "model.layers.0.input_layernorm.weight": torch.zeros(32)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text("x" * 5000)  # not a weight
    total, layers = report.weight_bytes(folder)
    assert (total, layers) == (64 * 32 * 2 + 64 * 16 + 32 * 4, 64 * 16 + 32 * 4)
    assert report.size_on_disk(folder) > total + 5000

    from test_gguf import tiny_spm_metadata

    model = random_model(tiny())
    gguf = write_gguf(model.config, model.state_dict().items(), tiny_spm_metadata(300), tmp_path / "m.gguf",
                      file_type="f32")
    total, layers = report.weight_bytes(gguf)
    n_total, n_layers = report.parameters(gguf)
    assert total == 4 * n_total and layers == 4 * n_layers  # f32: 4 bytes per parameter, tied head once
    assert n_layers == sum(p.numel() for p in model.model.layers.parameters())


def row(tool: str, name: str, ppl: float, layer_bytes: int = 100) -> dict:
    p = {"ppl": ppl, "pm": 0.1, "command": f"eval {name}"}
    return {"tool": tool, "name": name, "minicpm": p, "llama.cpp": {**p, "ppl": ppl + 1}, "size": 10,
            "weight_bytes": 100, "layer_bytes": layer_bytes, "decode": 50.0}


def result() -> dict:
    rows = [row("float", "bf16", 10.0), row("ours", "RTN int4 g128", 14.0), row("ours", "GPTQ int4 g128", 11.0),
            row("ours", "AWQ int4 g128", 13.0), row("ours", "RTN int8 per row", 10.5),
            row("ours", "GPTQ int8 per row", 10.25), row("llama.cpp", "Q4_K_M + imatrix", 12.0, layer_bytes=120)]
    rows[1]["quantize"] = {"seconds": 3.0, "rss": 200.0, "command": "minicpm quantize a b"}
    return {"model": "m", "parameters": 200, "layer_parameters": 160, "rows": rows, "seqlen": 512,
            "settings": {"samples": 4, "seqlen": 64, "windows": 2, "chunks": 3, "threads": 2, "minutes": 1.0,
                         "measured": "2026-12-03 20:00 UTC"}}


def test_recovered_is_the_share_of_rtns_increase_at_the_same_bits():
    r = result()
    rows = r["rows"]
    assert report.recovered(rows, rows[2], "minicpm") == "75%"     # (14 - 11) / (14 - 10)
    assert report.recovered(rows, rows[3], "minicpm") == "25%"
    assert report.recovered(rows, rows[5], "minicpm") == "50%"     # against RTN int8, not int4
    assert report.recovered(rows, rows[1], "minicpm") == ""        # RTN itself
    assert report.recovered(rows, rows[6], "minicpm") == ""        # not ours


def test_table_and_verdicts_read_the_rows():
    r = result()
    lines = report.table(r)
    assert len(lines) == 2 + len(r["rows"]) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| ours: RTN int4 g128 | 4.00 | 5.00 |" in lines[3]  # 100 bytes x 8 / 200; / 160 for the layers
    verdict = "\n".join(report.verdicts(r))
    assert "GPTQ int4 g128 recovers 75%" in verdict and "AWQ int4 g128 recovers 25%" in verdict
    assert ("Our best int4 at no more bits per layer weight than Q4_K_M + imatrix (GPTQ int4 g128, 5.00 "
            "bits/weight): 11.000 / 12.000") in verdict
    assert "against Q4_K_M + imatrix (6.00 bits/weight): 12.000 / 13.000: target met." in verdict
    # a better int4 that spends more bits than the peer is not the one compared
    r["rows"].insert(4, row("ours", "GPTQ int4 g32", 10.5, layer_bytes=130))
    r["rows"].insert(4, row("ours", "RTN int4 g32", 12.5, layer_bytes=130))
    verdict = "\n".join(report.verdicts(r))
    assert "(GPTQ int4 g128, 5.00 bits/weight)" in verdict
    assert "GPTQ int4 g32 recovers 80%" in verdict  # (12.5 - 10.5) / (12.5 - 10): against RTN at g32
    r["rows"][2]["llama.cpp"]["ppl"] = 13.5
    assert "target not met." in "\n".join(report.verdicts(r))
    # a model that int4 RTN hardly moves decides nothing: shares and the comparison are noise
    r["rows"][1]["minicpm"]["ppl"] = 10.05  # +0.5% over float
    verdict = "\n".join(report.verdicts(r))
    assert "GPTQ int4 g128 recovers n/a (minicpm protocol)" in verdict
    assert "target not decided: RTN int4 g128 moves this model's perplexity by +0.50% / +36.36%" in verdict
    text = report.markdown([r])
    assert "--models m --samples 4 --seqlen 64 --windows 2 --chunks 3 --threads 2" in text
    assert "ours: GPTQ int4 g128" in text and "minicpm quantize a b" in text


def written(tmp_path, first: str, second: str) -> str:
    """A hand-written doc after two reports were put into it, one after the other."""
    doc = tmp_path / "quantization.md"
    doc.write_text("# Quantization\n\nhand-written\n")
    report.write_doc(first, doc)
    report.write_doc(second, doc)
    return doc.read_text()


def test_the_report_replaces_only_the_text_between_its_markers(tmp_path):
    text = written(tmp_path, "first", "second")
    start, end = report.MARKERS
    assert text.count(start) == 1 and text.count(end) == 1
    assert "hand-written" in text and "second" in text and "first" not in text


def test_the_report_keeps_the_sections_of_models_not_measured_again(tmp_path):
    text = written(tmp_path, "## Report\n\nold header\n\n### base: 1 M\n\nold base\n\n### smollm2: 2 M\n\nold smollm2\n",
                   "## Report\n\nnew header\n\n### base: 3 M\n\nnew base\n")
    assert "new header" in text and "new base" in text and "old smollm2" in text
    assert "old header" not in text and "old base" not in text and "base: 1 M" not in text
    assert text.index("new base") < text.index("old smollm2") < text.index(report.MARKERS[1])


@pytest.mark.skipif(shutil.which("/usr/bin/time") is None, reason="GNU time is not installed")
def test_timed_command_reports_the_childs_own_peak_rss(tmp_path):
    import sys

    cmd = [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"]
    r = report.timed_command(cmd, tmp_path / "child.log")
    assert 200 < r["rss"] < 400 and r["seconds"] >= 0
    with pytest.raises(SystemExit, match="failed"):
        report.timed_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")
