"""The pure parts of the serving benchmark (benchmarks/serving.py): statistics and the table."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("serving_bench", Path(__file__).parents[1] / "benchmarks" / "serving.py")
serving = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = serving  # dataclasses look their module up there
spec.loader.exec_module(serving)


def test_percentile_interpolates_between_ranks():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert serving.percentile(values, 0.5) == statistics.median(values) == 3.0
    assert serving.percentile(values, 0.0) == 1.0 and serving.percentile(values, 1.0) == 5.0
    assert serving.percentile(values, 0.95) == pytest.approx(4.8)
    assert serving.percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError):
        serving.percentile([], 0.5)


def test_random_prompts_are_distinct_and_in_range():
    a, b = serving.random_prompt(1000, 64, seed=1), serving.random_prompt(1000, 64, seed=2)
    assert a != b and len(a) == 64 and all(100 <= t < 1000 for t in a + b)
    assert a == serving.random_prompt(1000, 64, seed=1)


def test_decode_rate_counts_tokens_while_every_stream_decodes():
    a = {"times": [0.0, 1.0, 2.0, 3.0, 4.0]}
    b = {"times": [1.5, 2.5, 3.5, 5.0]}  # started last at 1.5; a ended first at 4.0
    # inside (1.5, 4.0]: a's 2.0, 3.0, 4.0 and b's 2.5, 3.5 -> 5 tokens in 2.5 s
    assert serving.decode_rate([a, b]) == pytest.approx(2.0)
    assert serving.decode_rate([{"times": [0.0, 1.0]}, {"times": [2.0, 3.0]}]) is None  # never both busy


def test_table_gives_ratios_to_llama_server_and_own_single_stream():
    ours = serving.Server("ours", "int4", [])
    peer = serving.Server("llama-server", "q4_0", [])
    bursts = lambda one, sixteen: [serving.Burst(1, one, 1.0, 1.0, one, 64, 1.0, one),  # noqa: E731
                                   serving.Burst(16, sixteen, 2.0, 3.0, 5.0, 1024, 1.0, 2 * sixteen)]
    lines = serving.table("model", [(ours, bursts(20.0, 100.0)), (peer, bursts(10.0, 25.0))])
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ours") or line.startswith("| llama")]
    cells = [[c.strip() for c in row] for row in rows]
    assert cells[0][4:6] == ["2.00x", "1.00x"]  # aggregate 20 vs the peer's 10; vs own single stream
    assert cells[1][4:6] == ["4.00x", "5.00x"]  # 100 vs 25; 100 vs own 20
    assert cells[1][6:9] == ["200.0", "4.00x", "10.00x"]  # decode 200 vs the peer's 50 and own 20
    assert cells[2][4] == "" and cells[3][5] == "2.50x"  # the peer's rows carry no ratio to itself
