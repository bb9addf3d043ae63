"""The engines under test, each run inside the case's own process: ours (the PyTorch model, and
"lean": the torch-free runtime on the q4_0 GGUF), llama.cpp through llama-cpp-python, and
transformers' LlamaForCausalLM on the llama-format export.

Every runner returns load seconds, TTFT, prefill and decode tok/s and the weight bytes one decoded
token reads; the memory runners (`CTX_RUNNERS`) fill a 2k context instead.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from minicpm.bench.cases import (
    CTX,
    CTX_NEW,
    CTX_PROMPT,
    NEW_TOKENS,
    PROMPT_TOKENS,
    checkpoint_and_kv,
    lean_head,
    prompt_ids,
)
from minicpm.bench.checkpoints import ours_path
from minicpm.bench.process import llama_tools, measure_here


# --- loading, timed -------------------------------------------------------------------------------
def timed(load, *args, **kwargs):
    """(what `load(*args, **kwargs)` returns, the seconds it took)."""
    start = time.perf_counter()
    value = load(*args, **kwargs)
    return value, time.perf_counter() - start


def load_ours(path: Path, dtype: str | None):
    """(our model, load seconds); a GGUF file runs as stored (its quantized blocks kept)."""
    if path.suffix == ".gguf":
        from minicpm.formats import load_checkpoint

        return timed(lambda: load_checkpoint(path)[0])
    from minicpm.formats.hf import load_model

    return timed(load_model, path, dtype=dtype)


def load_transformers(path: Path, dtype):
    """(transformers' LlamaForCausalLM of a llama-format directory, in eval mode; load seconds)."""
    import transformers

    return timed(lambda: transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval())


def open_llama(path: Path, n_ctx: int, n_batch: int):
    """(llama-cpp-python's Llama on a GGUF file with BENCH_THREADS threads, load seconds)."""
    import llama_cpp

    return timed(llama_cpp.Llama, str(path), n_ctx=n_ctx, n_batch=n_batch,
                 n_threads=int(os.environ["BENCH_THREADS"]), verbose=False)


# --- what is measured -----------------------------------------------------------------------------
def timed_tokens(tokens) -> dict:
    """TTFT and decode speed from an iterator of tokens that starts with the prefill."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in tokens:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    ttft = first - start
    return {"ttft": ttft, "prefill": PROMPT_TOKENS / ttft,
            "decode": (count - 1) / max(end - first, 1e-9), "new_tokens": count}


def unique_weight_bytes(model) -> int:
    """Bytes of the weights one decoded token reads: every tensor once, except an embedding table
    that is not also the head (a lookup reads one row of it)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    # ours: model.model.embed_tokens; transformers: the same path. A quantized head (ours) is a
    # module without `.weight`, so the bf16 embedding beside it is lookup-only.
    # A tied embedding that reads the int8 head's rows (QuantizedEmbedding) has no table of its own.
    embed = getattr(model.model.embed_tokens, "weight", None)
    head = getattr(model.lm_head, "weight", None)
    if embed is not None and (head is None or head.data_ptr() != embed.data_ptr()):
        total -= embed.numel() * embed.element_size()
    return total


def gguf_weight_bytes(path: Path) -> int:
    """Tensor data of a GGUF file minus a separate embedding table (see unique_weight_bytes)."""
    from minicpm.formats.gguf.container import GGUFFile

    sizes = {t.name: t.n_bytes for t in GGUFFile(path).tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


# --- speed: a PROMPT_TOKENS prompt, NEW_TOKENS greedy tokens --------------------------------------
def ours_greedy_tokens(model, ids: list[int], new: int):
    """Ours: a short warm-up (first-call allocations), then the prompt and `new` greedy tokens,
    yielded as they come."""
    import torch

    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams

    warm = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=4, stop_token_ids=[])
    for _ in TokenGenerator(model, [ids[:16]], warm):
        pass
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=new, stop_token_ids=[])
    with torch.inference_mode():
        yield from TokenGenerator(model, [ids], params)


def fixed_token_decode_rate(model, ids, new: int) -> float:
    """Ours: decode steps per second after the prompt `ids` [1, P], each step fed a fixed token
    (the same sequence for every case compared, whatever the model predicts)."""
    import torch

    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1] + new + 1)
        model(ids, cache=cache, last_only=True)
        start = time.perf_counter()
        for i in range(new):
            model(torch.tensor([[(17 * i + 5) % 1000]]), cache=cache)
        return new / (time.perf_counter() - start)


def run_ours(workdir: Path, precision: str) -> dict:
    model, load = load_ours(ours_path(workdir, precision), "bfloat16")  # quantized in prepare()
    result = timed_tokens(ours_greedy_tokens(model, prompt_ids(model.config.vocab_size), NEW_TOKENS))
    return {**result, "load": load, "weight_bytes": unique_weight_bytes(model)}


def run_transformers(workdir: Path, precision: str) -> dict:
    import torch
    import transformers

    model, load = load_transformers(workdir / "llama", torch.bfloat16)
    ids = prompt_ids(model.config.vocab_size)
    stamps: list[float] = []

    class Clock(transformers.generation.streamers.BaseStreamer):
        # generate() calls put() once with the prompt, then once per new token
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.inference_mode():
        model.generate(torch.tensor([ids[:16]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0, streamer=Clock())
    first, end, count = stamps[1], stamps[-1], len(stamps) - 1
    ttft = first - start
    return {"ttft": ttft, "prefill": PROMPT_TOKENS / ttft, "decode": (count - 1) / (end - first),
            "new_tokens": count, "load": load, "weight_bytes": unique_weight_bytes(model)}


def open_lean(path: Path, kv_cache: str = "auto", head: str = "stored"):
    """(the lean runtime's model of a GGUF file on BENCH_THREADS threads, load seconds)."""
    from minicpm.lean import load as lean_load

    (model, _), load = timed(lean_load, path, threads=int(os.environ["BENCH_THREADS"]), kv_cache=kv_cache,
                             head=head)
    return model, load


def lean_greedy_tokens(model, ids: list[int], new: int):
    """The lean runtime: the prompt, then `new` greedy tokens, yielded as they come."""
    import numpy as np

    logits = model.forward(ids, 0)
    for step in range(new):
        token = int(np.argmax(logits))
        yield token
        if step < new - 1:
            logits = model.forward([token], model.length)


def timed_lean(model, ids: list[int], new: int) -> dict:
    """timed_tokens of the lean runtime's greedy tokens, after a short warm-up."""
    model.forward(ids[:16], 0)
    return timed_tokens(lean_greedy_tokens(model, ids, new))


def run_lean(workdir: Path, precision: str) -> dict:
    checkpoint, kv = checkpoint_and_kv(precision, default="auto")
    path = ours_path(workdir, checkpoint)
    model, load = open_lean(path, kv)
    result = timed_lean(model, prompt_ids(model.config.vocab_size), NEW_TOKENS)
    return {**result, "load": load, "weight_bytes": gguf_weight_bytes(path), "kv": model.cache.kind}


def llama_greedy_tokens(llm, ids: list[int], new: int):
    """llama.cpp: the prompt, then `new` greedy tokens, yielded as they come (the first after
    prefill)."""
    llm.eval(ids)
    for step in range(new):
        token = llm.sample(temp=0.0)
        yield token
        if step < new - 1:
            llm.eval([token])


def run_llamacpp(workdir: Path, precision: str) -> dict:
    path = workdir / f"model-{precision}.gguf"
    llm, load = open_llama(path, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 16, n_batch=PROMPT_TOKENS)
    ids = prompt_ids(llm.n_vocab())
    llm.eval(ids[:16])  # warm-up
    llm.reset()

    result = timed_tokens(llama_greedy_tokens(llm, ids, NEW_TOKENS))
    return {**result, "load": load, "weight_bytes": gguf_weight_bytes(path)}


# --- memory: a CTX_PROMPT prompt and CTX_NEW greedy tokens in a CTX-token cache -------------------
def ctx_ids(vocab: int) -> list[int]:
    return prompt_ids(vocab, CTX_PROMPT)


def ctx_result(tokens, load: float, kv: str) -> dict:
    result = timed_tokens(tokens)
    result["prefill"] = CTX_PROMPT / result["ttft"]
    return {**result, "load": load, "kv": kv, "context": CTX}


def run_ours_ctx(workdir: Path, precision: str) -> dict:
    """A CTX_PROMPT-token prompt and CTX_NEW greedy tokens in a CTX-token cache, an int8 KV cache
    (int4 where the precision says so) if offered."""
    import inspect

    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams

    checkpoint, kv_kind = checkpoint_and_kv(precision)
    model, load = load_ours(ours_path(workdir, checkpoint), "bfloat16")
    kv = "bf16"
    if "kv_dtype" in inspect.signature(model.new_cache).parameters:
        model.kv_cache_dtype = kv = kv_kind  # what TokenGenerator's new_cache then makes
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=CTX_NEW, stop_token_ids=[])
    return ctx_result(TokenGenerator(model, [ctx_ids(model.config.vocab_size)], params), load, kv)


def run_lean_ctx(workdir: Path, precision: str) -> dict:
    checkpoint, kv = checkpoint_and_kv(precision)
    model, load = open_lean(ours_path(workdir, checkpoint), kv, lean_head(precision))
    return ctx_result(lean_greedy_tokens(model, ctx_ids(model.config.vocab_size), CTX_NEW), load, kv)


def run_llamacpp_ctx(workdir: Path, precision: str) -> dict:
    llm, load = open_llama(workdir / f"model-{precision}.gguf", n_ctx=CTX, n_batch=512)
    ids = ctx_ids(llm.n_vocab())

    return ctx_result(llama_greedy_tokens(llm, ids, CTX_NEW), load, "f16")


REPEATS = 2  # llama-bench's runs per test (its -r)


def run_llama_bench(workdir: Path, precision: str) -> dict:
    """llama.cpp's own `llama-bench` on the same GGUF file, measured as ours are: prefill of a
    PROMPT_TOKENS prompt into an empty cache (pp), NEW_TOKENS decoded after a PROMPT_TOKENS-token
    context (tg at depth -d), each the mean of REPEATS runs; peak RSS is llama-bench's own (the
    largest child's: at least this small torch-free process's size at the fork)."""
    binary = llama_tools(Path(sys.executable).parent.parent, "llama-bench") / "llama-bench"
    path = workdir / f"model-{precision}.gguf"
    rates = {}
    for key, args in (("prefill", ["-p", str(PROMPT_TOKENS), "-n", "0"]),
                      ("decode", ["-p", "0", "-n", str(NEW_TOKENS), "-d", str(PROMPT_TOKENS)])):
        out = subprocess.run([str(binary), "-m", str(path), "-t", os.environ["BENCH_THREADS"], "-r", str(REPEATS),
                              "-o", "json", *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        rates[key] = json.loads(out.stdout)[0]["avg_ts"]
    return {**rates, "ttft": PROMPT_TOKENS / rates["prefill"], "load": None,
            "weight_bytes": gguf_weight_bytes(path),
            "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


RUNNERS = {"ours": run_ours, "lean": run_lean, "transformers": run_transformers, "llama.cpp": run_llamacpp,
           "llama-bench": run_llama_bench}
CTX_RUNNERS = {"ours": run_ours_ctx, "lean": run_lean_ctx, "llama.cpp": run_llamacpp_ctx}


def run_case_here(engine: str, precision: str, workdir: Path, threads: int,
                  mode: str = "speed") -> dict:
    """Entry point of the child process: one engine, one precision; mode "ctx": the 2k-context
    case."""
    runner = (CTX_RUNNERS if mode == "ctx" else RUNNERS)[engine]
    return measure_here(runner, threads, workdir, precision, torch_threads=engine not in ("lean", "llama-bench"))
