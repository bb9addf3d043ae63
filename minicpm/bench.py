"""`minicpm bench`: speed on the real MiniCPM shapes, side by side with llama.cpp and transformers.

Seeded random weights of a family shape (MiniCPM-1B by default, MiniCPM-2B with `full=True`)
are written once as a bf16 checkpoint, a llama-format checkpoint, f16/q8_0/q4_0 GGUF files and,
through the streaming `quantize_checkpoint`, our int8/int4 checkpoints (so our quantized rows load
what a user loads: load time and peak RSS are not those of quantizing). Then every engine runs in its own process (so peak RSS is its own, and one engine's allocator
state cannot slow the next) on the same threads:

  ours          bf16; int8 and int4 too when `minicpm.quantization` is importable
  llama.cpp     f16, q8_0, q4_0 through llama-cpp-python, when installed
  transformers  LlamaForCausalLM on the llama-format export, bf16

Measured: time to first token for a PROMPT_TOKENS prompt (prefill tok/s = prompt / that time),
decode tok/s over NEW_TOKENS greedy tokens at batch 1, and peak RSS. The machine's memory read
bandwidth is measured too; decode is also given as a fraction of the bandwidth-bound limit
(bandwidth / bytes of weights read per token; the KV cache, a few % here, is left out).
Random networks: speeds are real, the text is noise.

A second table is the memory target "chat with a 2k context": peak RSS of ours int4 (int8 KV
cache where the model offers one) and llama.cpp q4_0 (n_ctx 2048, its default f16 KV cache)
prefilling the same CTX_PROMPT-token prompt and decoding CTX_NEW tokens, filling the context.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPT_TOKENS = 512
NEW_TOKENS = 128
CTX = 2048                # the memory case: a full 2k context ...
CTX_NEW = 32              # ... of which this many tokens are generated
CTX_PROMPT = CTX - CTX_NEW
SEED = 0
# (engine, precision) in table order; the llama.cpp row of the same "class" is each row's peer.
CASES = [
    ("ours", "bf16"), ("ours", "int8"), ("ours", "int4"),
    ("llama.cpp", "f16"), ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0"),
    ("transformers", "bf16"),
]
PEER = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0", "f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}
QUANTIZED = {"int8": 8, "int4": 4}  # our quantized checkpoints: precision -> bits (group 128, int8 head)
MEMORY_CASES = [("ours", "int4"), ("llama.cpp", "q4_0")]


# --- preparation ----------------------------------------------------------------------------------
def random_tensors(config, seed: int = SEED):
    """(name, bf16 tensor) for every checkpoint tensor, generated one at a time.

    Drawn directly in bf16, so the largest transient is one tensor, never an fp32 model. Linear
    weights get a small std so activations stay finite through 52 layers of random matrices.
    """
    import torch

    from minicpm.formats.hf import checkpoint_state_dict
    from minicpm.model import MiniCPMForCausalLM

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        meta = MiniCPMForCausalLM(config)
    for name, tensor in checkpoint_state_dict(meta).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            yield name, torch.empty(tensor.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)


def bench_tokenizer():
    """The default model's tokenizer: any real vocabulary will do for random weights (llama.cpp
    needs one in the GGUF; spare embedding rows are named as padding by write_gguf)."""
    from minicpm.formats.gguf import open_gguf as _open_gguf
    from minicpm.loading import default_model_path
    from minicpm.tokenizer import Tokenizer

    _, _, meta = _open_gguf(default_model_path())
    return Tokenizer.from_gguf_metadata(meta)


def prepare(shape: str, workdir: Path, gguf_types=("f16", "q8_0", "q4_0"), log=print,
            quantized=tuple(QUANTIZED)) -> None:
    """Write `shape`'s random checkpoint as hf/ (bf16), ours-<int8|int4>/, llama/ (bf16) and
    model-<type>.gguf."""
    from minicpm.config import preset
    from minicpm.formats.gguf import write_gguf
    from minicpm.formats.hf import save_pretrained
    from minicpm.formats.llama import to_llama

    tokenizer = bench_tokenizer()
    config = preset(shape, torch_dtype="bfloat16")
    if tokenizer.vocab_size > config.vocab_size:  # tiny test shapes: GGUF needs a row per token
        config = config.replace(vocab_size=tokenizer.vocab_size)
    if config.max_position_embeddings < max(PROMPT_TOKENS + NEW_TOKENS, CTX):  # tiny shapes again
        config = config.replace(max_position_embeddings=max(PROMPT_TOKENS + NEW_TOKENS, CTX))
    start = time.perf_counter()
    state = dict(random_tensors(config))  # bf16 only: ~2.7 GB for 1B, ~5.5 GB for 2B
    save_pretrained(None, None, workdir / "hf", config=config, state_dict=state, overwrite=True)
    log(f"  {shape}: random bf16 checkpoint in {time.perf_counter() - start:.0f} s")
    if quantized and _has_quantization():
        prepare_quantized(workdir, quantized, log=lambda m: log(f"  {shape}: {m}"))
    for gguf_type in gguf_types:
        start = time.perf_counter()
        write_gguf(config, state.items(), tokenizer, workdir / f"model-{gguf_type}.gguf",
                   file_type=gguf_type, name=f"random {shape}")
        log(f"  {shape}: {gguf_type} GGUF in {time.perf_counter() - start:.0f} s")
    llama_config, llama_state = to_llama(config, state)
    del state  # the folded copy replaces it: never two models in memory for long
    save_pretrained(None, None, workdir / "llama", config=llama_config, state_dict=llama_state,
                    overwrite=True)


def prepare_quantized(workdir: Path, precisions=tuple(QUANTIZED), log=print) -> None:
    """ours-<precision>/ from hf/ by the streaming quantize_checkpoint, as `minicpm quantize` does."""
    from minicpm.quantization import quantize_checkpoint

    for precision in precisions:
        start = time.perf_counter()
        quantize_checkpoint(workdir / "hf", workdir / f"ours-{precision}", bits=QUANTIZED[precision],
                            group_size=128, head="int8", overwrite=True, progress=False)
        log(f"{precision} checkpoint (streaming quantize_checkpoint) in {time.perf_counter() - start:.0f} s")


def ours_path(workdir: Path, precision: str) -> Path:
    return workdir / ("hf" if precision == "bf16" else f"ours-{precision}")


# --- measurements (each in its own process) -------------------------------------------------------
def prompt_ids(vocab: int, n: int = PROMPT_TOKENS) -> list[int]:
    import random

    rng = random.Random(SEED)
    return [rng.randrange(10, vocab) for _ in range(n)]


def _timed_tokens(tokens) -> dict:
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
    return {"ttft": ttft, "prefill": PROMPT_TOKENS / ttft, "decode": (count - 1) / max(end - first, 1e-9),
            "new_tokens": count}


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


def run_ours(workdir: Path, precision: str) -> dict:
    import torch

    from minicpm.formats.hf import load_model
    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams

    start = time.perf_counter()
    model = load_model(ours_path(workdir, precision), dtype="bfloat16")  # quantized in prepare()
    load = time.perf_counter() - start
    ids = prompt_ids(model.config.vocab_size)
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=4, stop_token_ids=[])
    for _ in TokenGenerator(model, [ids[:16]], params):  # warm-up: first-call allocations
        pass
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    with torch.inference_mode():
        result = _timed_tokens(TokenGenerator(model, [ids], params))
    return {**result, "load": load, "weight_bytes": unique_weight_bytes(model)}


def run_transformers(workdir: Path, precision: str) -> dict:
    import torch
    import transformers

    start = time.perf_counter()
    model = transformers.LlamaForCausalLM.from_pretrained(workdir / "llama", dtype=torch.bfloat16).eval()
    load = time.perf_counter() - start
    ids = prompt_ids(model.config.vocab_size)
    stamps: list[float] = []

    class Clock(transformers.generation.streamers.BaseStreamer):
        # generate() calls put() once with the prompt, then once per new token
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    def tokens():
        with torch.inference_mode():
            model.generate(torch.tensor([ids[:16]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
            start = time.perf_counter()
            model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, pad_token_id=0, streamer=Clock())
        return start

    start = tokens()
    first, end, count = stamps[1], stamps[-1], len(stamps) - 1
    ttft = first - start
    return {"ttft": ttft, "prefill": PROMPT_TOKENS / ttft, "decode": (count - 1) / (end - first),
            "new_tokens": count, "load": load, "weight_bytes": unique_weight_bytes(model)}


def llama_greedy_tokens(llm, ids: list[int], new: int):
    """llama.cpp: the prompt, then `new` greedy tokens, yielded as they come (the first after prefill)."""
    llm.eval(ids)
    for step in range(new):
        token = llm.sample(temp=0.0)
        yield token
        if step < new - 1:
            llm.eval([token])


def run_llamacpp(workdir: Path, precision: str) -> dict:
    import llama_cpp

    path = workdir / f"model-{precision}.gguf"
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 16, n_batch=PROMPT_TOKENS,
                          n_threads=int(os.environ["BENCH_THREADS"]), verbose=False)
    load = time.perf_counter() - start
    ids = prompt_ids(llm.n_vocab())
    llm.eval(ids[:16])  # warm-up
    llm.reset()

    result = _timed_tokens(llama_greedy_tokens(llm, ids, NEW_TOKENS))
    return {**result, "load": load, "weight_bytes": gguf_weight_bytes(path)}


def gguf_weight_bytes(path: Path) -> int:
    """Tensor data of a GGUF file minus a separate embedding table (see unique_weight_bytes)."""
    from minicpm.formats.gguf.container import GGUFFile

    sizes = {t.name: t.n_bytes for t in GGUFFile(path).tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


def ctx_ids(vocab: int) -> list[int]:
    return prompt_ids(vocab, CTX_PROMPT)


def _ctx_result(tokens, load: float, kv: str) -> dict:
    result = _timed_tokens(tokens)
    result["prefill"] = CTX_PROMPT / result["ttft"]
    return {**result, "load": load, "kv": kv, "context": CTX}


def run_ours_ctx(workdir: Path, precision: str) -> dict:
    """A CTX_PROMPT-token prompt and CTX_NEW greedy tokens in a CTX-token cache, int8 KV if offered."""
    import inspect

    from minicpm.formats.hf import load_model
    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams

    start = time.perf_counter()
    model = load_model(ours_path(workdir, precision), dtype="bfloat16")
    load = time.perf_counter() - start
    kv = "bf16"
    if "kv_dtype" in inspect.signature(model.new_cache).parameters:
        model.kv_cache_dtype, kv = "int8", "int8"  # what TokenGenerator's new_cache then makes
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=CTX_NEW, stop_token_ids=[])
    return _ctx_result(TokenGenerator(model, [ctx_ids(model.config.vocab_size)], params), load, kv)


def run_llamacpp_ctx(workdir: Path, precision: str) -> dict:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(str(workdir / f"model-{precision}.gguf"), n_ctx=CTX, n_batch=512,
                          n_threads=int(os.environ["BENCH_THREADS"]), verbose=False)
    load = time.perf_counter() - start
    ids = ctx_ids(llm.n_vocab())

    return _ctx_result(llama_greedy_tokens(llm, ids, CTX_NEW), load, "f16")


RUNNERS = {"ours": run_ours, "transformers": run_transformers, "llama.cpp": run_llamacpp}
CTX_RUNNERS = {"ours": run_ours_ctx, "llama.cpp": run_llamacpp_ctx}


def run_case_here(engine: str, precision: str, workdir: Path, threads: int, mode: str = "speed") -> dict:
    """Entry point of the child process: one engine, one precision; mode "ctx": the 2k-context case."""
    import torch

    torch.set_num_threads(threads)
    result = (CTX_RUNNERS if mode == "ctx" else RUNNERS)[engine](workdir, precision)
    result["rss"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across fork+exec,
    so a child would report at least its parent's size at the fork. VmHWM starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(engine: str, precision: str, workdir: Path, threads: int, timeout: float = 1800,
             mode: str = "speed") -> dict | str:
    """One case in a fresh process; a dict of results, or why it did not run (one line)."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "minicpm.bench", engine, precision, str(workdir), str(threads), mode]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if result.returncode != 0:
        return ((result.stderr.strip().splitlines() or ["failed"])[-1])[:160]
    return json.loads(result.stdout.strip().splitlines()[-1])


def skip_reason(engine: str, precision: str) -> str | None:
    """Why a case cannot run on this installation, checked before spending time on it."""
    if engine == "ours" and precision != "bf16" and not _has_quantization():
        return "minicpm.quantization (quantize_checkpoint) is not available in this version"
    if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`make test-peer` builds it)"
    if engine == "transformers" and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    return None


def _has_quantization() -> bool:
    try:
        from minicpm.quantization import quantize_checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


# --- the machine ----------------------------------------------------------------------------------
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
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


# --- the table ------------------------------------------------------------------------------------
def markdown_table(columns: list[str], text_columns: int, rows: list[tuple[str, str, dict | str]],
                   cells) -> list[str]:
    """A Markdown table of (engine, precision, result) rows: `cells(result)` gives the cells after
    the first two of a measured row; a result that is a string says why the row was not run."""
    align = ["---" if i < text_columns else "---:" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    for engine, precision, r in rows:
        if isinstance(r, str):
            lines.append(f"| {engine} | {precision} | not run: {r} |" + " |" * (len(columns) - 3))
        else:
            lines.append("| " + " | ".join([engine, precision, *cells(precision, r)]) + " |")
    return lines


def ratios(rows: list[tuple[str, str, dict | str]], peer_of: dict[str, str]):
    """cells -> (prefill, decode) ratio strings against llama.cpp's row at the matching precision."""
    peer = {p: r for e, p, r in rows if e == "llama.cpp" and isinstance(r, dict)}

    def of(precision: str, r: dict) -> list[str]:
        p = peer.get(peer_of.get(precision, precision))
        return [f"{r[k] / p[k]:.2f}x" if p else "n/a" for k in ("prefill", "decode")]
    return of


def table(shape: str, rows: list[tuple[str, str, dict | str]], bandwidth: float) -> str:
    """Markdown rows for one shape; ratios are to llama.cpp at the matching precision."""
    ratio = ratios(rows, PEER)

    def cells(precision: str, r: dict) -> list[str]:
        limit = bandwidth * 1e9 / r["weight_bytes"]
        return [f"{r['load']:.1f}", f"{r['ttft']:.2f}", f"{r['prefill']:.1f}", f"{r['decode']:.2f}",
                f"{r['weight_bytes'] / 1e9:.2f}", f"{r['decode'] / limit:.0%} of {limit:.1f}", f"{r['rss']:.0f}",
                *ratio(precision, r)]

    columns = ["engine", "precision", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "weights GB/token",
               "decode / bandwidth limit", "peak RSS MB", "prefill vs llama.cpp", "decode vs llama.cpp"]
    return "\n".join([f"### {shape}", "", *markdown_table(columns, 2, rows, cells)]) + "\n"


def memory_table(shape: str, rows: list[tuple[str, str, dict | str]]) -> str:
    """The 2k-context chat case: peak RSS first, speeds for context."""
    def cells(precision: str, r: dict) -> list[str]:
        return [r["kv"], f"{r['load']:.1f}", f"{r['prefill']:.1f}", f"{r['decode']:.2f}", f"{r['rss']:.0f}"]

    columns = ["engine", "precision", "KV cache", "load s", "prefill tok/s", "decode tok/s", "peak RSS MB"]
    title = f"#### {shape}: chat with a {CTX}-token context ({CTX_PROMPT}-token prompt + {CTX_NEW} new tokens)"
    return "\n".join([title, "", *markdown_table(columns, 3, rows, cells)]) + "\n"


def header(threads: int, bandwidth: float) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"## MiniCPM shapes, random weights ({stamp})", "",
        f"Machine: {machine()}; threads: {threads}; memory read bandwidth {bandwidth:.1f} GB/s "
        "(best sum over a 1 GiB fp32 tensor).",
        f"Seeded random weights of the real shapes (config presets), bf16 checkpoint; GGUFs written "
        f"from the same weights by `write_gguf` (q4_0 keeps the tied head in q8_0, as llama.cpp does). "
        f"Prefill: one {PROMPT_TOKENS}-token prompt, TTFT = prompt in to first token out. Decode: "
        f"{NEW_TOKENS} new tokens, batch 1, greedy. Each engine in its own process; ours int8/int4 "
        "load checkpoints written beforehand by `quantize_checkpoint` (head int8, int4 group 128; a "
        "tied embedding reads the int8 head's rows). The bandwidth "
        "limit is bandwidth / weight bytes read per token (KV cache left out). Ratios are to "
        "llama.cpp at the matching precision (bf16 vs f16, int8 vs q8_0, int4 vs q4_0).", "",
    ])


def run(shapes: list[str], workdir: Path, threads: int, log=print) -> str:
    """Prepare and measure every shape in `shapes`; returns the Markdown section."""
    bandwidth = memory_bandwidth_gbs(threads)
    log(f"memory read bandwidth: {bandwidth:.1f} GB/s on {threads} threads")
    parts = [header(threads, bandwidth)]
    for shape in shapes:
        shape_dir = workdir / shape
        log(f"preparing {shape} ...")
        prepare(shape, shape_dir, log=log)
        rows = []
        for engine, precision in CASES:
            reason = skip_reason(engine, precision)
            if reason is None:
                log(f"  running {engine} {precision} ...")
            result = reason or run_case(engine, precision, shape_dir, threads)
            if isinstance(result, dict):
                log(f"    prefill {result['prefill']:.1f} tok/s, decode {result['decode']:.2f} tok/s")
            rows.append((engine, precision, result))
        parts.append(table(shape, rows, bandwidth))
        memory_rows = []
        for engine, precision in MEMORY_CASES:
            reason = skip_reason(engine, precision)
            if reason is None:
                log(f"  running {engine} {precision} with a {CTX}-token context ...")
            result = reason or run_case(engine, precision, shape_dir, threads, mode="ctx")
            if isinstance(result, dict):
                log(f"    peak RSS {result['rss']:.0f} MB")
            memory_rows.append((engine, precision, result))
        parts.append(memory_table(shape, memory_rows))
        _remove_tree(shape_dir)  # the next shape needs the disk
    return "\n".join(parts)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def shapes_for(full: bool, preset_name: str | None = None) -> list[str]:
    if preset_name:
        return [preset_name]
    return ["minicpm-1b", "minicpm-2b"] if full else ["minicpm-1b"]


def bench(full: bool = False, threads: int | None = None, preset_name: str | None = None,
          workdir: Path | None = None, log=print) -> str:
    """Run the benchmark in a scratch directory (removed afterwards); returns the Markdown."""
    import tempfile

    if threads is not None and threads < 1:
        from minicpm.errors import MiniCPMError

        raise MiniCPMError(f"threads must be >= 1, got {threads}")
    threads = default_threads() if threads is None else threads
    if workdir is not None:
        return run(shapes_for(full, preset_name), Path(workdir), threads, log=log)
    with tempfile.TemporaryDirectory(prefix="minicpm-bench-") as tmp:
        return run(shapes_for(full, preset_name), Path(tmp), threads, log=log)


def default_threads() -> int:
    # The comparisons are at 2 threads (a laptop's worth); more cores only when asked.
    return min(os.cpu_count() or 1, 2)


if __name__ == "__main__":  # child process: python -m minicpm.bench ENGINE PRECISION WORKDIR THREADS [MODE]
    engine_arg, precision_arg, workdir_arg, threads_arg = sys.argv[1:5]
    mode_arg = sys.argv[5] if len(sys.argv) > 5 else "speed"
    print(json.dumps(run_case_here(engine_arg, precision_arg, Path(workdir_arg), int(threads_arg), mode_arg)))
