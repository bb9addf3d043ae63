"""`minicpm bench`: speed on the real MiniCPM shapes, side by side with llama.cpp and transformers.

Seeded random weights of a family shape (MiniCPM-1B by default, MiniCPM-2B with `full=True`)
are written once as a bf16 checkpoint, a llama-format checkpoint, f16/q8_0/q4_0 GGUF files and,
through the streaming `quantize_checkpoint`, our int8/int4 checkpoints (so our quantized rows load
what a user loads: load time and peak RSS are not those of quantizing). Then every engine runs in
its own process (so peak RSS is its own, and one engine's allocator state cannot slow the next) on
the same threads:

  ours          bf16; int8 and int4 too when `minicpm.quantization` is importable; the q4_0 GGUF
  lean          the q4_0 GGUF on the torch-free runtime (minicpm.lean), as `minicpm chat` runs it
  llama.cpp     f16, q8_0, q4_0 through llama-cpp-python, when installed
  transformers  LlamaForCausalLM on the llama-format export, bf16

Measured: time to first token for a PROMPT_TOKENS prompt (prefill tok/s = prompt / that time),
decode tok/s over NEW_TOKENS greedy tokens at batch 1, and peak RSS. The machine's memory read
bandwidth is measured too; decode is also given as a fraction of the bandwidth-bound limit
(bandwidth / bytes of weights read per token; the KV cache, a few % here, is left out).
Random networks: speeds are real, the text is noise.

A second table is the memory target "chat with a 2k context": peak RSS of ours int4 (int8 KV
cache where the model offers one, and int4 layers, head and KV cache as the least memory), the lean
runtime on the q4_0 GGUF (int8 and int4 KV caches) and
llama.cpp q4_0 (n_ctx 2048, its default f16 KV cache) prefilling the same CTX_PROMPT-token prompt
and decoding CTX_NEW tokens, filling the context.

Here: `bench`, the entry `minicpm bench` calls. The parts: cases (what is measured), checkpoints
(the random weights in every engine's format), process (each case in its own process), engines
(the runners inside it; `python -m minicpm.bench` is that process), machine (CPU, bandwidth),
report (the Markdown).
"""

from __future__ import annotations

import os
from pathlib import Path

from minicpm.bench.cases import CASES, CTX, MEMORY_CASES
from minicpm.bench.checkpoints import prepare, prepared
from minicpm.bench.machine import memory_bandwidth_gbs
from minicpm.bench.process import run_case, skip_reason
from minicpm.bench.report import header, memory_table, table

# per mode: what the "running" line adds, and the line a measured case logs
_RUNNING = {"speed": "", "ctx": f" with a {CTX}-token context"}
_MEASURED = {
    "speed": lambda r: f"prefill {r['prefill']:.1f} tok/s, decode {r['decode']:.2f} tok/s",
    "ctx": lambda r: f"peak RSS {r['rss']:.0f} MB",
}


def bench(full: bool = False, threads: int | None = None, preset_name: str | None = None,
          workdir: Path | None = None, log=print) -> str:
    """Run the benchmark in a scratch directory (removed afterwards); returns the Markdown."""
    import tempfile

    if threads is not None and threads < 1:
        from minicpm.errors import MiniCPMError

        raise MiniCPMError(f"threads must be >= 1, got {threads}")
    threads = default_threads() if threads is None else threads
    if workdir is not None:  # kept: checkpoints found there are reused, new ones stay
        return run(shapes_for(full, preset_name), Path(workdir), threads, log=log, keep=True)
    with tempfile.TemporaryDirectory(prefix="minicpm-bench-") as tmp:
        return run(shapes_for(full, preset_name), Path(tmp), threads, log=log)


def run(shapes: list[str], workdir: Path, threads: int, log=print, keep: bool = False) -> str:
    """Prepare and measure every shape in `shapes`; returns the Markdown section. With `keep`,
    a shape whose checkpoints are all in `workdir` already is not written again, nor removed."""
    import shutil

    bandwidth = memory_bandwidth_gbs(threads)
    log(f"memory read bandwidth: {bandwidth:.1f} GB/s on {threads} threads")
    parts = [header(threads, bandwidth)]
    for shape in shapes:
        shape_dir = workdir / shape
        if keep and prepared(shape_dir):
            log(f"reusing the {shape} checkpoints in {shape_dir}")
        else:
            log(f"preparing {shape} ...")
            prepare(shape, shape_dir, log=log)
        parts.append(table(shape, measure(CASES, shape_dir, threads, "speed", log), bandwidth))
        parts.append(memory_table(shape, measure(MEMORY_CASES, shape_dir, threads, "ctx", log)))
        if not keep:
            shutil.rmtree(shape_dir, ignore_errors=True)  # the next shape needs the disk
    return "\n".join(parts)


def measure(cases, shape_dir: Path, threads: int, mode: str,
            log=print) -> list[tuple[str, str, dict | str]]:
    """(engine, precision, results or why not run) of every case, each in its own process."""
    rows = []
    for engine, precision in cases:
        reason = skip_reason(engine, precision)
        if reason is None:
            log(f"  running {engine} {precision}{_RUNNING[mode]} ...")
        result = reason or run_case(engine, precision, shape_dir, threads, mode=mode)
        if isinstance(result, dict):
            log(f"    {_MEASURED[mode](result)}")
        rows.append((engine, precision, result))
    return rows


def shapes_for(full: bool, preset_name: str | None = None) -> list[str]:
    if preset_name:
        return [preset_name]
    return ["minicpm-1b", "minicpm-2b"] if full else ["minicpm-1b"]


def default_threads() -> int:
    # The comparisons are at 2 threads (a laptop's worth); more cores only when asked.
    return min(os.cpu_count() or 1, 2)
