"""The machine a benchmark ran on: its CPU, and its memory read bandwidth (decode's speed limit)."""

from __future__ import annotations

import os
import platform
import time


def memory_bandwidth_gbs(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: the best of a few sums over a buffer far larger than any cache."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    data.sum()  # first touch faults the pages in; not a measurement
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def machine() -> str:
    """CPU model, core count and OS, for the tables' headers."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
