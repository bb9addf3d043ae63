"""MiniCPM-2B-128k at 128k tokens with an int4 KV cache: peak memory, decode speed at the full
context, and prefill speed at several depths (from which the whole prefill's time is estimated).

A real 128k-token prefill of the 2B-128k shape takes hours on 2 cores (attention alone is ~3 PFLOP),
so the cache is filled the quick way: positions between the measured chunks are written through
the cache's own `write` (the same quantization as a prefill's) with random keys and values, not
computed by the model. What is measured is real: a `--chunk`-token prompt chunk run by the model
at each depth (its attention reads every cached position), then `--new` decoded tokens at the
full length, and the process's peak RSS (VmHWM) with the whole cache held. The prefill estimate
fits the chunk times as a + b * depth (attention grows linearly with depth, the rest does not)
and sums that over every chunk of the length.

Weights: seeded random MiniCPM-2B-128k shape (dynamic NTK rope, untied head), int4 layers in groups
of 128 and an int4 head (`layer_shared_tensors`: one layer drawn, stored in every layer), written
once under --keep.

    .venv/bin/python benchmarks/context_128k.py [--length 128k] [--chunk 256] [--depths 5] [--new 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minicpm.bench.arguments import count, folder
from minicpm.bench.cases import INT4_HEAD4
from minicpm.bench.checkpoints import ours_path, prepare_layer_shared
from minicpm.bench.process import measure_here, run_child
from minicpm.cache import KEY_BLOCK
from minicpm.config import preset

SHAPE = "minicpm-2b-128k"
FILL_STEP = 8192  # positions written per cache.write call while filling


def fill(model, cache, end: int, seed: int) -> None:
    """Write random keys/values at positions [cache.length, end) of every layer, as a prefill
    writes them (through cache.write), FILL_STEP positions a call."""
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(seed)
    while cache.length < end:
        n = min(FILL_STEP, end - cache.length)
        shape = (1, config.num_key_value_heads, n, config.head_dim)
        k = torch.randn(shape, generator=gen).to(model.dtype)
        v = torch.randn(shape, generator=gen).to(model.dtype)
        for layer in range(config.num_hidden_layers):
            cache.write(layer, k, v)
        cache.length += n


def depths(length: int, chunk: int, new: int, points: int) -> list[int]:
    """`points` depths from 0 to the last chunk that leaves room for `new` tokens, on the int4
    cache's key blocks (where writing may resume)."""
    last = (length - chunk - new) // KEY_BLOCK * KEY_BLOCK
    return [round(last * i / (points - 1)) // KEY_BLOCK * KEY_BLOCK for i in range(points)]


def run(workdir: Path, length: int, chunk: int, points: int, new: int) -> dict:
    import torch

    from minicpm.bench.engines import load_ours

    model, load = load_ours(ours_path(workdir, INT4_HEAD4), "bfloat16")
    cache = model.new_cache(1, length, kv_dtype="int4")
    gen = torch.Generator().manual_seed(1)
    chunks, fill_seconds = [], 0.0
    with torch.inference_mode():
        for depth in depths(length, chunk, new, points):
            start = time.perf_counter()
            fill(model, cache, depth, seed=depth)
            fill_seconds += time.perf_counter() - start
            ids = torch.randint(10, model.config.vocab_size, (1, chunk), generator=gen)
            depth, start = cache.length, time.perf_counter()  # past the previous chunk if depths are close
            logits = model(ids, cache=cache, last_only=True)
            chunks.append({"depth": depth, "seconds": time.perf_counter() - start})
            print(f"chunk of {chunk} at depth {depth}: {chunks[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
        fill(model, cache, length - new, seed=length)
        token = logits[:, -1:].argmax(-1)
        stamps = []
        for _ in range(new):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
            stamps.append(time.perf_counter())
    return {"load": load, "chunks": chunks, "fill_seconds": fill_seconds, "length": cache.length,
            "decode": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "cache_bytes": cache.nbytes(),
            "finite": bool(torch.isfinite(logits).all())}


def estimate_prefill(chunks: list[dict], chunk: int, length: int) -> tuple[float, float, float]:
    """(a, b, seconds): chunk time ~ a + b * depth by least squares, summed over the length's chunks."""
    n = len(chunks)
    xs, ys = [c["depth"] for c in chunks], [c["seconds"] for c in chunks]
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    a = my - b * mx
    return a, b, sum(a + b * depth for depth in range(0, length, chunk))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=count(1024, "--length", k=True), default="128k", help="context, tokens (k = 1024)")
    p.add_argument("--chunk", type=count(32, "--chunk", k=True), default="256", help="prompt chunk timed at each depth")
    p.add_argument("--depths", type=count(2, "--depths"), default="5", help="how many depths are timed")
    p.add_argument("--new", type=count(2, "--new"), default="8", help="tokens decoded at the full length")
    p.add_argument("--threads", type=count(1, "--threads"), default="2")
    p.add_argument("--keep", type=folder, default=Path.home() / ".cache/minicpm/bench")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    workdir = args.keep / SHAPE
    if args.chunk + args.new > args.length // 2:
        sys.exit(f"--chunk {args.chunk} + --new {args.new} must fit well inside --length {args.length}")
    at = depths(args.length, args.chunk, args.new, args.depths)
    if any(later - earlier < args.chunk for earlier, later in zip(at, at[1:])):
        sys.exit(f"--depths {args.depths}: the timed chunks of {args.chunk} tokens would overlap in "
                 f"{args.length} tokens; ask for fewer depths or a longer --length")
    if args.child:
        print(json.dumps(measure_here(run, args.threads, workdir, args.length, args.chunk, args.depths, args.new)))
        return
    if not ours_path(workdir, INT4_HEAD4).is_dir():
        print(f"writing {SHAPE} to {workdir}", flush=True)
        prepare_layer_shared(preset(SHAPE, torch_dtype="bfloat16"), workdir, INT4_HEAD4, gguf=False)
    cmd = [sys.executable, __file__, "--child", "--length", str(args.length), "--chunk", str(args.chunk),
           "--depths", str(args.depths), "--new", str(args.new), "--threads", str(args.threads),
           "--keep", str(args.keep)]
    r = run_child(cmd, args.threads, timeout=4 * 3600, width=400)
    if isinstance(r, str):
        sys.exit(f"the measurement failed: {r}")
    a, b, total = estimate_prefill(r["chunks"], args.chunk, args.length)
    print(f"\n{SHAPE} shape, int4 layers and head, int4 KV cache, {args.length} tokens, {args.threads} threads\n")
    print("| depth | chunk of %d tokens, s | prefill tok/s there |" % args.chunk)
    print("| ---: | ---: | ---: |")
    for c in r["chunks"]:
        print(f"| {c['depth']} | {c['seconds']:.1f} | {args.chunk / c['seconds']:.1f} |")
    print(f"\npeak RSS (VmHWM) {r['rss']:.0f} MiB ({r['rss'] / 1024:.2f} GiB) with {r['length']} positions "
          f"cached; the cache itself {r['cache_bytes'] / 1024**3:.2f} GiB; load {r['load']:.1f} s")
    print(f"decode at {args.length} tokens: {r['decode']:.2f} tok/s; last logits finite: {r['finite']}")
    print(f"whole prefill, estimated (chunk time {a:.2f} s + {b * 1024:.3f} s per 1k of depth, summed over "
          f"{-(-args.length // args.chunk)} chunks): {total / 3600:.1f} h ({args.length / total:.1f} tok/s)")
    print(f"(filling the cache between chunks with random keys/values took {r['fill_seconds']:.0f} s; "
          "it is not counted)")


if __name__ == "__main__":
    main()
