"""Perplexity throughput beside llama.cpp: the llama.cpp protocol (512-token chunks, BOS over each
chunk's first token, the second half scored) on the same GGUF file (the default model's shipped
Q4_1 SmolLM2 unless given), the first CHUNKS chunks of WikiText-2 test, the same threads. Ours is
`minicpm.evaluation.perplexity` on the file as loaded; llama.cpp's is llama-cpp-python with
`logits_all`, timed over its forward passes only (its NLLs are summed outside the timing, in
numpy). Each engine runs in its own process (`python -m minicpm.bench.perplexity ENGINE ...`).

`perplexity_bench()` gives both perplexities (with llama.cpp's ±), both tokens/s and their ratio;
`perplexity_section()` the Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import sys
import time

from minicpm.bench.process import measure_here, run_child, skip_reason

CHUNKS = 8
N_CTX = 512


def ours(path: str, chunks: int) -> dict:
    from minicpm.evaluation.ppl import encode_text, perplexity, read_data
    from minicpm.formats import load_checkpoint

    model, tokenizer = load_checkpoint(path)
    ids = encode_text(tokenizer, read_data("wikitext2", "llama.cpp").text)
    perplexity(model, tokenizer, ids[:2 * N_CTX], protocol="llama.cpp", limit=1, progress=False)  # warm-up
    r = perplexity(model, tokenizer, ids, protocol="llama.cpp", limit=chunks, progress=False)
    return {"ppl": r.ppl, "uncertainty": r.uncertainty, "tokens_per_second": r.tokens_per_second,
            "seconds": r.seconds, "chunks": r.n_windows, "scored": r.n_tokens_scored}


def llamacpp(path: str, chunks: int) -> dict:
    import os

    import llama_cpp
    import numpy as np

    from minicpm.evaluation.ppl import read_data

    llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True,
                          n_threads=int(os.environ["BENCH_THREADS"]), verbose=False)
    text = read_data("wikitext2", "llama.cpp").text
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    llm.eval(tokens[:8])  # warm-up
    nll, seconds = [], 0.0
    for i in range(chunks):
        chunk = tokens[i * N_CTX:(i + 1) * N_CTX]
        chunk = [bos] + chunk[1:] if bos is not None else chunk
        llm.reset()
        start = time.perf_counter()
        llm.eval(chunk)
        seconds += time.perf_counter() - start
        logits = np.asarray(llm.scores[N_CTX // 2:N_CTX - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll += (lse - logits[np.arange(len(logits)), chunk[N_CTX // 2 + 1:]]).tolist()
    v = np.asarray(nll)
    ppl = math.exp(v.mean())
    return {"ppl": ppl, "uncertainty": ppl * math.sqrt(v.var() / (len(v) - 1)),
            "tokens_per_second": chunks * N_CTX / seconds, "seconds": seconds, "chunks": chunks,
            "scored": len(v)}


ENGINES = {"ours": ours, "llama.cpp": llamacpp}


def perplexity_bench(path: str | None = None, threads: int = 2, chunks: int = CHUNKS) -> dict:
    """{"ours": ..., "llama.cpp": ..., "ratio": ours/llama.cpp tokens/s}; an engine that could not
    run gives the reason (a string) instead of its dict."""
    if path is None:
        from minicpm.loading import default_model_path

        path = str(default_model_path())
    out: dict = {"model": path, "threads": threads, "chunks": chunks, "n_ctx": N_CTX}
    for engine in ENGINES:
        cmd = [sys.executable, "-m", "minicpm.bench.perplexity", engine, path, str(threads), str(chunks)]
        out[engine] = skip_reason(engine, "") or run_child(cmd, threads, timeout=1800)
    both = [out[e] for e in ENGINES if isinstance(out[e], dict)]
    out["ratio"] = both[0]["tokens_per_second"] / both[1]["tokens_per_second"] if len(both) == 2 else None
    return out


def perplexity_section(result: dict) -> str:
    """docs/benchmarks.md's section for `perplexity_bench()`'s result."""
    lines = ["## Perplexity throughput (llama.cpp protocol)", "",
             f"The first {result['chunks']} {result['n_ctx']}-token chunks of WikiText-2 test, BOS over each "
             f"chunk's first token, the second half scored; the same GGUF ({result['model']}); "
             f"{result['threads']} threads. tokens/s counts every token run through the model.", "",
             "| engine | ppl | ± | tokens/s | vs llama.cpp |", "| --- | ---: | ---: | ---: | ---: |"]
    for engine in ENGINES:
        r = result[engine]
        if isinstance(r, str):
            lines.append(f"| {engine} | not run: {r} | | | |")
            continue
        ratio = f"{result['ratio']:.2f}x" if engine == "ours" and result["ratio"] else ""
        lines.append(f"| {engine} | {r['ppl']:.4f} | {r['uncertainty']:.4f} | "
                     f"{r['tokens_per_second']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one engine, in this process: python -m minicpm.bench.perplexity ENGINE PATH THREADS CHUNKS
    engine, path, threads, chunks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(measure_here(ENGINES[engine], threads, path, chunks)))
