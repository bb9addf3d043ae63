"""Long prompts: prefill and decode at 16k/32k tokens, ours beside llama.cpp on the same weights.

The MiniCPM-1B shape from `minicpm bench`'s checkpoints (`--keep`, default ~/.cache/minicpm/bench:
run `minicpm bench` or benchmarks/run.py once to make them): ours int4 (groups of 128, int8 head)
with an int8 KV cache, against llama.cpp on the q4_0 GGUF of the same weights with its default f16
KV cache. The preset's context is 4096 and MiniCPM-1B has no rope scaling, so for longer prompts
ours reads a copy of the checkpoint's config.json with max_position_embeddings raised (the weight
files are linked, not copied); llama.cpp is given n_ctx. Each case runs in a fresh process (its
peak RSS is its own, VmHWM): a seeded random prompt of the length, prefilled 512 tokens a call,
then --new greedy tokens.

    .venv/bin/python benchmarks/long_context.py [--lengths 16k,32k] [--new 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minicpm.bench.arguments import count, folder
from minicpm.bench.process import measure_here, run_child

SHAPE = "minicpm-1b"


def lengths(spec: str) -> list[int]:
    return [count(16, "a prompt length", k=True)(part) for part in spec.split(",")]


def long_copy(workdir: Path, context: int) -> Path:
    """ours-int4 with max_position_embeddings = context: config.json rewritten, the rest linked."""
    source, target = workdir / "ours-int4", workdir / f"ours-int4-ctx{context}"
    target.mkdir(exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    config = json.loads((source / "config.json").read_text())
    config["max_position_embeddings"] = context
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def timed(generated, length: int) -> dict:
    """Prefill and decode rates from an iterator of tokens that starts with the prefill."""
    import time

    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in generated]
    ttft = stamps[0] - start
    return {"prefill": length / ttft, "decode": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "ttft": ttft}


def run_ours(workdir: Path, length: int, new: int) -> dict:
    from minicpm.bench.cases import prompt_ids
    from minicpm.bench.engines import load_ours
    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams

    model, _ = load_ours(long_copy(workdir, length + new + 16), "bfloat16")
    model.kv_cache_dtype = "int8"
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=new, stop_token_ids=[])
    ids = prompt_ids(model.config.vocab_size, length)
    return timed(TokenGenerator(model, [ids], params, prefill_chunk=512), length)


def run_llamacpp(workdir: Path, length: int, new: int) -> dict:
    from minicpm.bench.cases import prompt_ids
    from minicpm.bench.engines import llama_greedy_tokens, open_llama

    llm, _ = open_llama(workdir / "model-q4_0.gguf", n_ctx=length + new + 16, n_batch=512)
    return timed(llama_greedy_tokens(llm, prompt_ids(llm.n_vocab(), length), new), length)


RUNNERS = {"ours": run_ours, "llama.cpp": run_llamacpp}
LABELS = {"ours": "ours int4, int8 KV", "llama.cpp": "llama.cpp q4_0, f16 KV"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=lengths, default="16k", help="prompt lengths, comma-separated (k = 1024)")
    p.add_argument("--new", type=count(2, "--new (decode speed is timed between tokens)"), default=16,
                   help="greedy tokens after the prompt (>= 2)")
    p.add_argument("--threads", type=count(1, "--threads"), default=2)
    p.add_argument("--keep", type=folder, default=Path.home() / ".cache/minicpm/bench",
                   help="minicpm bench's checkpoint folder")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    workdir = args.keep / SHAPE
    if args.child:
        engine, length = args.child
        print(json.dumps(measure_here(RUNNERS[engine], args.threads, workdir, int(length), args.new)))
        return
    if not (workdir / "ours-int4").is_dir() or not (workdir / "model-q4_0.gguf").is_file():
        sys.exit(f"no {SHAPE} checkpoints in {workdir}: run benchmarks/run.py --keep {args.keep} first")
    rows = []
    for length in args.lengths:
        for engine in RUNNERS:
            cmd = [sys.executable, __file__, "--child", engine, str(length), "--new", str(args.new),
                   "--threads", str(args.threads), "--keep", str(args.keep)]
            result = run_child(cmd, args.threads, timeout=3 * 3600)
            print(f"{length} tokens, {LABELS[engine]}: {result}", flush=True)
            rows.append((length, engine, result))
    print("\n| prompt | engine | prefill tok/s | decode tok/s | peak RSS MiB | prefill vs llama.cpp "
          "| decode vs llama.cpp |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for length, engine, r in rows:
        peer = next((x for n, e, x in rows if n == length and e == "llama.cpp"), None)
        if isinstance(r, str):
            print(f"| {length} | {LABELS[engine]} | {r} | | | | |")
            continue
        ratio = (lambda key: f"{r[key] / peer[key]:.2f}x") if isinstance(peer, dict) else (lambda key: "")
        print(f"| {length} | {LABELS[engine]} | {r['prefill']:.1f} | {r['decode']:.2f} | {r['rss']:.0f} "
              f"| {ratio('prefill')} | {ratio('decode')} |")
    print(f"\n{args.threads} threads, {args.new} new tokens; {SHAPE} shape, seeded random weights")


if __name__ == "__main__":
    main()
