"""MiniCPM-MoE-8x2B decode: ours int4 beside llama.cpp q4_0 on the same weights, and beside a dense
model with the same active parameters.

Two shapes of seeded random weights: MiniCPM-MoE-8x2B (40 layers of 8 experts, 2 chosen per
token) and "dense 4B-active", MiniCPM-2B with intermediate_size 2 x 5760 (the same weights per
token as two experts, without the router). A bf16 MoE is 27 GB, so neither is drawn whole: one
decoder layer is drawn and every layer's tensors are that layer's (`layer_shared_tensors`); the
files store every layer in full, so a token still reads 40 layers of distinct memory. Each shape
is written once as ours int4 (groups of 128, int8 head) and llama.cpp's q4_0 GGUF (~8 GB and ~7 GB
for the MoE), then every case runs `minicpm bench`'s speed case in a fresh process: a 512-token
prompt, 128 greedy tokens, same threads; peak RSS is the process's VmHWM. The weights one token
reads are the dense model's (the MoE's attention, two experts and head, the router aside), so each
decode rate is also given as GB/s of weights read, beside the machine's measured read bandwidth.

    .venv/bin/python benchmarks/moe.py [--threads 2] [--keep ~/.cache/minicpm/bench]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from minicpm.bench.arguments import count, folder
from minicpm.bench.checkpoints import ours_path, prepare_layer_shared
from minicpm.bench.machine import machine, memory_bandwidth_gbs
from minicpm.bench.process import run_case, skip_reason
from minicpm.config import preset

SHAPES = {
    "minicpm-moe-8x2b": lambda: preset("minicpm-moe-8x2b", torch_dtype="bfloat16"),
    "dense-4b-active": lambda: preset("minicpm-2b", intermediate_size=2 * 5760, torch_dtype="bfloat16"),
}
CASES = [("ours", "int4"), ("llama.cpp", "q4_0")]
DISK_BYTES = 20 * 1024**3  # both shapes' files, with room to spare


def prepare(workdir: Path) -> None:
    for name, make_config in SHAPES.items():
        folder = workdir / name
        if ours_path(folder, "int4").is_dir() and (folder / "model-q4_0.gguf").is_file():
            continue
        free = shutil.disk_usage(workdir).free
        if free < DISK_BYTES:
            sys.exit(f"{workdir}: {free / 1024**3:.1f} GiB free; the checkpoints need about "
                     f"{DISK_BYTES / 1024**3:.0f} GiB")
        print(f"writing {name} to {folder}", flush=True)
        prepare_layer_shared(make_config(), folder)


def table(rows: list[tuple[str, str, str, dict | str]], threads: int, bandwidth: float) -> str:
    lines = ["| model | engine | prefill tok/s | decode tok/s | weights read GB/s | peak RSS MiB "
             "| decode vs llama.cpp | decode vs dense (same engine) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    found = {(shape, engine): r for shape, engine, _, r in rows if isinstance(r, dict)}
    for shape, engine, precision, r in rows:
        if isinstance(r, str):
            lines.append(f"| {shape} | {engine} {precision} | {r} | | | | | |")
            continue
        peer, dense = found.get((shape, "llama.cpp")), found.get(("dense-4b-active", engine))
        vs_peer = f"{r['decode'] / peer['decode']:.2f}x" if peer and engine != "llama.cpp" else ""
        vs_dense = f"{r['decode'] / dense['decode']:.2f}x" if dense and shape != "dense-4b-active" else ""
        read = f"{r['decode'] * dense['weight_bytes'] / 1e9:.1f}" if dense else ""
        lines.append(f"| {shape} | {engine} {precision} | {r['prefill']:.1f} | {r['decode']:.2f} | {read} "
                     f"| {r['rss']:.0f} | {vs_peer} | {vs_dense} |")
    lines.append(f"\n{machine()}; {threads} threads; memory read bandwidth {bandwidth:.1f} GB/s. 512-token "
                 "prompt, 128 greedy tokens; seeded random weights, one layer's tensors repeated in every "
                 "layer (every layer stored in full). Weights read per token: the dense model's.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=count(1, "--threads"), default=2)
    p.add_argument("--keep", type=folder, default=Path.home() / ".cache/minicpm/bench",
                   help="where the checkpoints are written once and reused")
    p.add_argument("--prepare-only", action="store_true", help="write the checkpoints, measure nothing")
    args = p.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    prepare(args.keep)
    if args.prepare_only:
        return
    bandwidth = memory_bandwidth_gbs(args.threads)
    print(f"memory read bandwidth {bandwidth:.1f} GB/s", flush=True)
    rows = []
    for shape in SHAPES:
        for engine, precision in CASES:
            result = skip_reason(engine, precision) or run_case(engine, precision, args.keep / shape,
                                                                args.threads, timeout=3600)
            print(f"{shape}, {engine} {precision}: {result}", flush=True)
            rows.append((shape, engine, precision, result))
    print()
    print(table(rows, args.threads, bandwidth))


if __name__ == "__main__":
    main()
