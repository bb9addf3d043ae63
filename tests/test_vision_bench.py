"""benchmarks/vision.py without the big checkpoint: the prompts both engines get, our engine's
measurements on the tiny fixture, the peer settings' notes and the table."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from minicpm.vision import MiniCPMVConfig

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("vision_bench", ROOT / "benchmarks" / "vision.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_prompts_hold_one_span_per_slice():
    prompts = bench.prompts(MiniCPMVConfig.from_hf(bench.RELEASED))
    small, large = prompts["448x448"], prompts["1344x896"]
    assert len(small["bounds"]) == 1 and len(large["bounds"]) == 7  # overview + 3x2 tiles
    for p in (small, large):
        assert all(end - start == 64 for start, end in p["bounds"])
        assert p["ids"][-1] == bench.AI_ID and p["ids"][-21:-1] == bench.QUESTION
        assert sum(1 for i in p["ids"] if i == 0) == 64 * len(p["bounds"])  # the <unk> positions


def test_our_engine_measures_on_the_tiny_fixture(tmp_path):
    shutil.copytree(ROOT / "tests" / "fixtures" / "minicpmv", tmp_path / bench.FLOAT_DIR)
    config = MiniCPMVConfig.from_file(tmp_path / bench.FLOAT_DIR / "config.json")
    torch.set_num_threads(1)
    result = bench.bench_ours(tmp_path, "bf16", 1, bench.prompts(config))
    for image in bench.IMAGES:
        assert result[f"encode {image}"] > 0 and result[f"first token {image}"] > result[f"encode {image}"] / 10


def test_missing_peer_is_a_note_not_a_failure(tmp_path):
    def setting(python, code):
        return bench.peer_setting(type("Args", (), {"peer_python": python, "peer_code": code}))

    assert "MINICPMV_PEER_PYTHON" in setting(None, None)
    assert "does not exist" in setting(str(tmp_path / "nope"), str(tmp_path))
    assert "no modeling_minicpmv.py" in setting(shutil.which("python3"), str(tmp_path))
    (tmp_path / "modeling_minicpmv.py").write_text("")
    assert setting(shutil.which("python3"), str(tmp_path)) == (shutil.which("python3"), str(tmp_path))


def test_table_ratios_notes_and_memory_verdict():
    times = {f"{kind} {image}": 2.0 for image in bench.IMAGES for kind in ("encode", "first token")}
    rows = [("ours", "bf16", {**times, "load": 1.0, "rss": 6000.0}),
            ("official", "bf16", {**{k: 4.0 for k in times}, "load": 9.0, "rss": 7000.0}),
            ("official", "fp32", "set MINICPMV_PEER_PYTHON and MINICPMV_PEER_CODE (docs/vision.md)"),
            ("ours", "int4 LLM + bf16 vision", {**times, "load": 3.0, "rss": 3000.0})]
    text = bench.vision_table(rows, threads=2, repeats=1)
    assert "| ours | bf16 | 1.0 | 2.00 (2.0x) |" in text
    assert "| official | fp32 | not run: set MINICPMV_PEER_PYTHON" in text
    assert "3000 MiB = 3.15 GB (under the 3.5 GB target)" in text
