"""The pure parts of benchmarks/context_128k.py and benchmarks/moe.py: where the chunks are timed,
the prefill estimate, the MoE table's ratios. No timings are asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import benchmark_script

context = benchmark_script("context_128k")
moe = benchmark_script("moe")


def test_depths_start_at_zero_end_before_the_last_chunk_and_sit_on_key_blocks():
    found = context.depths(131072, 256, 8, 5)
    assert found[0] == 0 and len(found) == 5 and found == sorted(found)
    assert all(d % 32 == 0 for d in found)
    assert found[-1] + 256 + 8 <= 131072 and found[-1] > 131072 - 256 - 8 - 32


def test_prefill_estimate_recovers_a_linear_cost_and_sums_every_chunk():
    chunks = [{"depth": d, "seconds": 2.0 + 0.001 * d} for d in (0, 1000, 3000)]
    a, b, total = context.estimate_prefill(chunks, 100, 1000)
    assert a == pytest.approx(2.0) and b == pytest.approx(0.001)
    assert total == pytest.approx(sum(2.0 + 0.001 * d for d in range(0, 1000, 100)))


def test_count_arguments_take_k_for_lengths_and_refuse_nonsense():
    import argparse

    from minicpm.bench.arguments import count

    parse = count(32, "--chunk", k=True)
    assert parse("128k") == 131072 and parse("256") == 256 and parse("0.5k") == 512
    for bad in ("abc", "16", "-1k", "", "infk", "nank"):
        with pytest.raises(argparse.ArgumentTypeError, match="--chunk takes a whole number >= 32"):
            parse(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="--threads"):
        count(1, "--threads")("2k")  # k only where a length is meant


def test_moe_table_compares_with_the_peer_and_the_dense_model():
    def row(decode):
        return {"prefill": 10.0, "decode": decode, "rss": 1000.0, "weight_bytes": 2e9}

    rows = [("minicpm-moe-8x2b", "ours", "int4", row(6.0)), ("minicpm-moe-8x2b", "llama.cpp", "q4_0", row(4.0)),
            ("dense-4b-active", "ours", "int4", row(8.0)), ("dense-4b-active", "llama.cpp", "q4_0", "timed out")]
    lines = moe.table(rows, 2, 30.0).splitlines()
    # ours MoE: the dense model's weights read 6 times a second; vs llama.cpp's MoE, vs our dense
    assert lines[2].endswith("| 6.00 | 12.0 | 1000 | 1.50x | 0.75x |")
    assert lines[3].endswith("| 4.00 |  | 1000 |  |  |")  # the peer: no ratio to itself, no dense peer
    assert "timed out" in lines[5]


def test_folder_arguments_refuse_a_file(tmp_path):
    import argparse

    from minicpm.bench.arguments import folder

    assert folder(str(tmp_path / "new")) == tmp_path / "new"  # to be made
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file; give a folder"):
        folder(str(tmp_path / "file"))


def test_overlapping_timed_chunks_are_refused_before_any_work(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "context_128k.py"
    done = subprocess.run([sys.executable, str(script), "--length", "4k", "--chunk", "64", "--depths", "200",
                           "--keep", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "would overlap" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written
