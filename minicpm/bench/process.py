"""Every benchmark case in a fresh process of its own, so that its peak RSS is its own and one
engine's allocator state cannot slow the next; also why a case cannot run here at all."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def run_case(engine: str, precision: str, workdir: Path, threads: int, timeout: float = 1800,
             mode: str = "speed") -> dict | str:
    """One case in a fresh process; a dict of results, or why it did not run (one line)."""
    cmd = [sys.executable, "-m", "minicpm.bench", engine, precision, str(workdir), str(threads),
           mode]
    return run_child(cmd, threads, timeout)


def run_child(cmd: list[str], threads: int, timeout: float, width: int = 160) -> dict | str:
    """Run `cmd`, a child that prints its results as JSON on its last line, on `threads` threads
    (BENCH_THREADS, OMP_NUM_THREADS); the results, or the last `width` characters of why not."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if result.returncode != 0:
        return ((result.stderr.strip().splitlines() or ["failed"])[-1])[:width]
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_here(runner, threads: int, *args, torch_threads: bool = True) -> dict:
    """The child's side: `runner(*args)`'s results, with peak RSS; on `threads` torch threads
    unless the runner never imports torch (`torch_threads` False)."""
    if torch_threads:
        import torch

        torch.set_num_threads(threads)
    result = runner(*args)
    result.setdefault("rss", peak_rss_mb())  # a runner that times another program gives that one's
    result["torch_imported"] = "torch" in sys.modules  # the lean runtime's rows must say False
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across fork+exec,
    so a child would report at least its parent's size at the fork. VmHWM starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama_tools(venv: Path, *targets: str) -> Path:
    """The folder of llama.cpp's own tools (llama-server, llama-quantize, ...), built once by the source
    tree's scripts/build_llama_tools.sh; a missing script or a failed build stops with its last lines."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_llama_tools.sh"
    if not script.is_file():
        sys.exit(f"error: {script} is missing: llama.cpp's tools are built from a source checkout of minicpm")
    out = subprocess.run(["bash", str(script), str(venv), *targets], capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-8:])
        sys.exit(f"error: building llama.cpp's {', '.join(targets)} failed ({out.returncode}):\n{tail}")
    return Path(out.stdout.strip().splitlines()[-1])


def skip_reason(engine: str, precision: str) -> str | None:
    """Why a case cannot run on this installation, checked before spending time on it."""
    if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`make test-peer` builds it)"
    if engine == "transformers" and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if engine == "llama-bench" and not (Path(__file__).resolve().parents[2] / "scripts" / "build_llama_tools.sh").is_file():
        return "llama.cpp's tools are built from a source checkout of minicpm (scripts/build_llama_tools.sh)"
    return None
