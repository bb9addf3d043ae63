"""Serving benchmark: `minicpm serve` against llama.cpp's own `llama-server`, side by side.

Both servers run as real processes on loopback with the same threads and 16 slots (ours:
`--max-batch 16`; llama-server: `-np 16 -cb`, the KV pool sized to 16 slots). For each model and
each concurrency (1, 4, 16), that many streaming /v1/completions requests start at once, each with
its own random prompt of --prompt-tokens token ids (distinct prompts: no prompt-cache hits) and a
fixed reply length (greedy, ignore_eos). One client implementation (httpx) serves both servers.

Measured per burst: aggregate generated tokens/s (all completion tokens / wall time of the burst,
prefill included), decode tokens/s while every stream is decoding (from the last stream's first
token to the first stream's last token: the batching gain without the prefill), p50/p95 time to
first token, and the median per-stream decode rate. Every request must return exactly
--max-tokens tokens, or the run fails loudly.

Models:
  smollm2  the default model's GGUF (SmolLM2-135M-Instruct, Q4_1). Both servers run the file as
           stored; ours also dequantized to bf16.
  1b       seeded random weights of the MiniCPM-1B shape: ours int4 (group 128, int8 head, from
           `minicpm.bench.checkpoints.prepare`) against llama-server on a q4_0 GGUF of the same weights.

    python benchmarks/serving.py [--models smollm2,1b] [--concurrency 1,4,16] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from minicpm.bench.process import llama_tools

VENV_BIN = Path(sys.executable).parent
SLOTS = 16


@dataclass
class Server:
    name: str  # "ours" or "llama-server"
    precision: str
    command: list[str]


@dataclass
class Burst:
    concurrency: int
    aggregate: float  # generated tokens / wall seconds
    ttft_p50: float
    ttft_p95: float
    stream_rate: float  # median per-stream decode tok/s after the first token
    tokens: int
    wall: float
    decode: float | None = None  # tok/s while every stream was decoding (None: no such moment)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, min(vocab, 49000)) for _ in range(n)]  # ids every tokenizer here has


def start(server: Server, port: int, timeout: float = 600) -> subprocess.Popen:
    cmd = [part.replace("{port}", str(port)) for part in server.command]
    log_file = tempfile.NamedTemporaryFile(prefix=f"{server.name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {proc.returncode}; log: {log_file.name}\n"
                               + Path(log_file.name).read_text()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{server.name} did not answer /health in {timeout:.0f} s (log: {log_file.name})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times: list[float] = []  # arrival of each token chunk
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                usage = payload["usage"]
            if payload.get("choices"):
                times.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"ttft": times[0] - sent, "decode_s": times[-1] - times[0], "tokens": tokens, "times": times}


def decode_rate(results: list[dict]) -> float | None:
    """Tokens/s of all streams together while every one of them was decoding: from the last
    first token to the first last token (no prefill in that window, every slot busy)."""
    start, end = max(r["times"][0] for r in results), min(r["times"][-1] for r in results)
    if end - start <= 0:
        return None
    inside = sum(start < t <= end for r in results for t in r["times"])
    return inside / (end - start)


async def burst(url: str, concurrency: int, prompt_tokens: int, max_tokens: int, vocab: int, seed: int) -> Burst:
    prompts = [random_prompt(vocab, prompt_tokens, seed * 1000 + i) for i in range(concurrency)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        start_time = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start_time
    wrong = [r["tokens"] for r in results if r["tokens"] != max_tokens]
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {concurrency} requests returned {wrong} tokens, not {max_tokens}")
    ttfts = [r["ttft"] for r in results]
    rates = [(r["tokens"] - 1) / r["decode_s"] for r in results if r["decode_s"] > 0]
    total = sum(r["tokens"] for r in results)
    return Burst(concurrency, total / wall, percentile(ttfts, 0.5), percentile(ttfts, 0.95),
                 statistics.median(rates) if rates else 0.0, total, wall, decode_rate(results))


def measure(server: Server, concurrencies: list[int], prompt_tokens: int, max_tokens: int, vocab: int,
            log=print) -> list[Burst]:
    port = free_port()
    log(f"  starting {server.name} {server.precision} ...")
    proc = start(server, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(burst(url, 1, prompt_tokens, 8, vocab, seed=99))  # warm-up (kernels, first-call setup)
        out = []
        for i, concurrency in enumerate(concurrencies):
            result = asyncio.run(burst(url, concurrency, prompt_tokens, max_tokens, vocab, seed=i + 1))
            decode = "n/a" if result.decode is None else f"{result.decode:.1f}"
            log(f"    {concurrency:>2} streams: {result.aggregate:6.1f} tok/s aggregate, {decode} while all decode, TTFT p50 "
                f"{result.ttft_p50:.2f} s p95 {result.ttft_p95:.2f} s, per stream {result.stream_rate:.1f} tok/s")
            out.append(result)
        return out
    finally:
        stop(proc)


# ---------------------------------------------------------------------- the servers


def ours(model: Path, precision: str, threads: int, context: int, dtype: str | None = None) -> Server:
    cmd = [str(VENV_BIN / "minicpm"), "serve", str(model), "--port", "{port}", "--threads", str(threads),
           "--max-batch", str(SLOTS), "--max-queue", str(SLOTS * 4), "--context", str(context)]
    if dtype:
        cmd += ["--dtype", dtype]
    return Server("ours", precision, cmd)


def llama_server(binary: Path, gguf: Path, precision: str, threads: int, context: int) -> Server:
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}", "-t", str(threads),
           "-tb", str(threads), "-np", str(SLOTS), "-cb", "-c", str(context * SLOTS), "--no-webui"]
    return Server("llama-server", precision, cmd)


def smollm2_servers(workdir: Path, binary: Path, threads: int, context: int, log=print) -> tuple[list[Server], int]:
    from minicpm.loading import default_model_path

    gguf = default_model_path()
    servers = [ours(gguf, "Q4_1", threads, context), ours(gguf, "bf16", threads, context, dtype="bfloat16"),
               llama_server(binary, gguf, "Q4_1", threads, context)]
    return servers, 49152


def minicpm_1b_servers(workdir: Path, binary: Path, threads: int, context: int, log=print) -> tuple[list[Server], int]:
    from minicpm.bench.checkpoints import bench_tokenizer, prepare
    from minicpm.config import preset

    shape_dir = workdir / "minicpm-1b"
    if not (shape_dir / "model-q4_0.gguf").exists():
        log("  writing random MiniCPM-1B weights, our int4 checkpoint and a q4_0 GGUF ...")
        prepare("minicpm-1b", shape_dir, gguf_types=("q4_0",), quantized=("int4",), log=log)
        bench_tokenizer().save_pretrained(shape_dir / "ours-int4")  # the server needs a tokenizer
    servers = [ours(shape_dir / "ours-int4", "int4", threads, context),
               llama_server(binary, shape_dir / "model-q4_0.gguf", "q4_0", threads, context)]
    return servers, preset("minicpm-1b").vocab_size


MODELS = {"smollm2": ("SmolLM2-135M-Instruct", smollm2_servers), "1b": ("MiniCPM-1B shape, random weights",
                                                                         minicpm_1b_servers)}


# ---------------------------------------------------------------------- the table


def table(title: str, rows: list[tuple[Server, list[Burst]]]) -> list[str]:
    peer = {b.concurrency: b for s, bursts in rows if s.name == "llama-server" for b in bursts}
    lines = [f"### {title}", "",
             "| server | precision | streams | aggregate tok/s | vs llama-server | x own 1-stream "
             "| decode tok/s, all streams busy | vs llama-server | x own 1-stream | TTFT p50 s | TTFT p95 s "
             "| per-stream tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for server, bursts in rows:
        own = next((b for b in bursts if b.concurrency == 1), None)
        for b in bursts:
            p = None if server.name == "llama-server" else peer.get(b.concurrency)
            cells = [f"{b.aggregate:.1f}", ratio(b.aggregate, p and p.aggregate),
                     ratio(b.aggregate, own and own.aggregate),
                     "n/a" if b.decode is None else f"{b.decode:.1f}", ratio(b.decode, p and p.decode),
                     ratio(b.decode, own and own.decode), f"{b.ttft_p50:.2f}", f"{b.ttft_p95:.2f}",
                     f"{b.stream_rate:.1f}"]
            lines.append(f"| {server.name} | {server.precision} | {b.concurrency} | " + " | ".join(cells) + " |")
    return lines + [""]


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else ""


def header(threads: int, prompt_tokens: int, max_tokens: int) -> list[str]:
    from minicpm.bench.machine import machine

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"## Serving: {stamp}", "",
            f"Machine: {machine()}; {threads} threads for every server. Each burst: N streaming "
            f"/v1/completions requests at once, distinct random {prompt_tokens}-token prompts, {max_tokens} "
            f"greedy tokens each (ignore_eos). Aggregate = all generated tokens / wall time of the burst "
            f"(prefill included). llama-server: llama.cpp's own server built from the llama-cpp-python "
            f"sdist's source with AMX off, `-np {SLOTS} -cb`. Ours: `minicpm serve --max-batch {SLOTS}`.", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,1b", help="comma-separated: smollm2, 1b")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated stream counts")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workdir", default=None, help="keep prepared checkpoints here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the Markdown section here")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if any(not 1 <= c <= SLOTS for c in concurrencies):
        parser.error(f"concurrency must be in [1, {SLOTS}]")
    text = run_serving(models, concurrencies, args.prompt_tokens, args.max_tokens, args.threads,
                       Path(args.workdir) if args.workdir else None)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def run_serving(models: list[str], concurrencies: list[int], prompt_tokens: int = 128, max_tokens: int = 64,
                threads: int = 2, workdir: Path | None = None, log=print) -> str:
    """Measure every model's servers; returns the Markdown section."""
    context = prompt_tokens + max_tokens + 16
    log("llama-server: building once, or using the cached build ...")
    binary = llama_tools(VENV_BIN.parent, "llama-server") / "llama-server"
    lines = header(threads, prompt_tokens, max_tokens)
    with tempfile.TemporaryDirectory(prefix="minicpm-serving-") as tmp:
        workdir = workdir or Path(tmp)
        for name in models:
            title, make = MODELS[name]
            log(f"{title}:")
            servers, vocab = make(workdir, binary, threads, context, log=log)
            rows = [(s, measure(s, concurrencies, prompt_tokens, max_tokens, vocab, log=log)) for s in servers]
            lines += table(title, rows)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
