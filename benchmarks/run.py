"""`make bench`: speed side by side with the peers, on the same weights and the same threads.

Every engine runs the same model (the default SmolLM2-135M-Instruct) in its own process, so that
peak memory is its own: first the shipped Q4_1 GGUF file itself (ours runs its quantized blocks
as stored; llama.cpp the same file), then dequantized once to fp32 and bf16:

  ours         minicpm, this package
  lean         minicpm's torch-free runtime (minicpm.lean, what `minicpm chat` runs) on the shipped file
  transformers LlamaForCausalLM on our llama-format export of the same weights (float rows only)
  llama.cpp    llama-cpp-python (if installed; `make test-peer` builds it) on the shipped GGUF,
               or on a GGUF we write from the same weights at the same precision

Measured per engine: prefill tokens/s (a 512-token prompt), decode tokens/s (64 new tokens after
it, batch 1, greedy), and peak RSS. Results go to docs/benchmarks.md with the date and machine, and each
row carries its ratio to the peer at the same precision.

A second section (the `minicpm.bench` package, also `minicpm bench`) runs seeded random weights
of the real MiniCPM-1B shape (and MiniCPM-2B with --full, ~5.5 GB in bf16) at a 512-token prompt
and 128 new tokens, with our int8/int4 rows when minicpm.quantization is there, and the machine's
memory bandwidth.

After it, perplexity throughput (minicpm.bench.perplexity): the llama.cpp protocol on the shipped
GGUF, ours against llama-cpp-python, both perplexities and tokens/s.

A third section (benchmarks/serving.py; skip it with --no-serving) serves SmolLM2 and the
MiniCPM-1B shape with `minicpm serve` and with llama.cpp's `llama-server` (16 slots, continuous
batching) and fires 1, 4 and 16 concurrent streams at each: aggregate tokens/s and time to first
token.

A fourth section (benchmarks/eval_tasks.py; skip it with --no-eval-tasks) scores 200 OCNLI items
by log-likelihood with `minicpm.evaluation` and with lm-eval's `hf` backend: items/s and accuracy.

A fifth section (benchmarks/vision.py; skip it with --no-vision) times MiniCPM-V 2.0's image
encoding and a chat turn's first token on random weights of the released shape, ours against the
official remote code (found through MINICPMV_PEER_PYTHON / MINICPMV_PEER_CODE), and the peak RSS
with an int4 decoder.
A sixth section (benchmarks/training.py; skip it with --no-training) fine-tunes with LoRA, seq 512,
batch 8, with `minicpm train sft` and with Hugging Face `Trainer` + `peft` on the same data:
tokens/s, peak RSS and the first losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# shared with the shapes section: the same prompt, loaders, child processes and table
from minicpm.bench.arguments import count
from minicpm.bench.cases import prompt_ids
from minicpm.bench.engines import load_ours, load_transformers, open_lean, open_llama, timed_lean
from minicpm.bench.machine import machine
from minicpm.bench.process import measure_here, run_child
from minicpm.bench.report import markdown_table, ratios

PROMPT_TOKENS = 512
SHIPPED = "Q4_1 GGUF"  # the default model's own file, run as stored
NEW_TOKENS = 64
ROOT = Path(__file__).resolve().parents[1]


def bench_ours(workdir: Path, dtype: str) -> dict:
    """Prefill and decode from the token timestamps of one generation (as the shapes section
    measures), after a short warm-up."""
    import torch

    from minicpm.bench.engines import timed_tokens
    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams

    model, load = load_ours(_gguf(workdir, dtype) if dtype == SHIPPED else workdir / "hf", dtype)
    ids = prompt_ids(model.config.vocab_size, PROMPT_TOKENS)

    def tokens(prompt: list[int], new: int):
        params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=new, stop_token_ids=[])
        return TokenGenerator(model, [prompt], params)

    for _ in tokens(ids[:8], 4):  # warm-up, as the other engines get
        pass
    with torch.inference_mode():
        result = timed_tokens(tokens(ids, NEW_TOKENS))
    # the prefill rate from this section's own prompt length (timed_tokens assumes the shapes')
    return {"load": load, "prefill": PROMPT_TOKENS / result["ttft"], "decode": result["decode"]}


def bench_lean(workdir: Path, dtype: str) -> dict:
    """The torch-free runtime (minicpm.lean) on the shipped file, as `minicpm chat` runs it."""
    model, load = open_lean(_gguf(workdir, dtype))
    result = timed_lean(model, prompt_ids(model.config.vocab_size, PROMPT_TOKENS), NEW_TOKENS)
    return {"load": load, "prefill": PROMPT_TOKENS / result["ttft"], "decode": result["decode"]}


def bench_transformers(workdir: Path, dtype: str) -> dict:
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model, load = load_transformers(workdir / "llama", torch_dtype)
    ids = prompt_ids(model.config.vocab_size, PROMPT_TOKENS)
    with torch.inference_mode():
        model(torch.tensor([ids[:8]]))
        start = time.perf_counter()
        model(torch.tensor([ids]))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
        total = time.perf_counter() - start
    new = out.shape[1] - PROMPT_TOKENS
    return {"load": load, "prefill": PROMPT_TOKENS / prefill,
            "decode": (new - 1) / max(total - prefill, 1e-9)}


def bench_llamacpp(workdir: Path, dtype: str) -> dict:
    llm, load = open_llama(_gguf(workdir, dtype), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 16,
                           n_batch=PROMPT_TOKENS)
    ids = prompt_ids(llm.n_vocab(), PROMPT_TOKENS)
    llm.eval(ids[:8])
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode = time.perf_counter() - start
    return {"load": load, "prefill": PROMPT_TOKENS / prefill, "decode": (NEW_TOKENS - 1) / decode}


def _gguf(workdir: Path, dtype: str) -> Path:
    if dtype == SHIPPED:
        from minicpm.loading import default_model_path

        return default_model_path()
    return workdir / f"model-{dtype}.gguf"


ENGINES = {"ours": bench_ours, "lean": bench_lean, "transformers": bench_transformers, "llama.cpp": bench_llamacpp}


def prepare(workdir: Path) -> None:
    """Write the default model once as an HF directory, a llama-format directory and GGUFs."""
    import minicpm
    from minicpm.formats.gguf import write_gguf
    from minicpm.formats.hf import checkpoint_state_dict, save_pretrained
    from minicpm.formats.llama import to_llama

    model, tokenizer = minicpm.load(dtype="float32")  # the float rows: dequantized once
    save_pretrained(model, tokenizer, workdir / "hf", overwrite=True)
    config, state = to_llama(model.config, checkpoint_state_dict(model))
    save_pretrained(None, tokenizer, workdir / "llama", config=config, state_dict=state,
                    overwrite=True)
    for dtype, gguf_type in (("float32", "f32"), ("bfloat16", "bf16")):
        write_gguf(model.config, checkpoint_state_dict(model).items(), tokenizer,
                   workdir / f"model-{dtype}.gguf", file_type=gguf_type)


def run_case(workdir: Path, engine: str, dtype: str, threads: int) -> dict | str:
    cmd = [sys.executable, __file__, "--case", engine, dtype, "--workdir", str(workdir),
           "--threads", str(threads)]
    return run_child(cmd, threads, timeout=1200, width=120)


def smollm2_table(rows: list[tuple[str, str, dict | str]], threads: int) -> str:
    lines = [
        f"## SmolLM2-135M-Instruct ({date.today().isoformat()})", "",
        f"Machine: {machine()}; threads: {threads}. "
        "Model: SmolLM2-135M-Instruct (the default model): its shipped Q4_1 GGUF as stored "
        "(ours and llama.cpp on the same file), then dequantized and run by every engine at the "
        "precision shown.",
        f"Prefill: one {PROMPT_TOKENS}-token prompt. "
        f"Decode: {NEW_TOKENS} new tokens, batch 1, greedy. "
        "Ratios are to llama.cpp at the same precision (higher is better for speed).", "",
    ]
    ratio = ratios(rows, {})

    def cells(dtype: str, r: dict) -> list[str]:
        return [f"{r['load']:.2f}", f"{r['prefill']:.1f}", f"{r['decode']:.1f}", f"{r['rss']:.0f}",
                *ratio(dtype, r)]

    columns = ["engine", "precision", "load s", "prefill tok/s", "decode tok/s", "peak RSS MB",
               "prefill vs llama.cpp", "decode vs llama.cpp"]
    return "\n".join(lines + markdown_table(columns, 2, rows, cells)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=count(1, "--threads"), default=min(os.cpu_count() or 1, 2))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--case", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true",
                        help="also the MiniCPM-2B shape (~5.5 GB in bf16)")
    parser.add_argument("--shapes-only", action="store_true", help="skip the SmolLM2 section")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the shapes' checkpoints into DIR and keep them; reuse them next time")
    parser.add_argument("--no-serving", action="store_true",
                        help="skip the serving section (vs llama-server)")
    parser.add_argument("--no-eval-tasks", action="store_true",
                        help="skip the multiple-choice scoring section (OCNLI vs lm-eval's hf backend)")
    parser.add_argument("--no-vision", action="store_true",
                        help="skip the MiniCPM-V section (image encoding and first token vs the official code)")
    parser.add_argument("--no-training", action="store_true",
                        help="skip the LoRA fine-tuning section (vs Trainer + peft)")
    # e.g. tiny: a quick check of the machinery
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        engine, dtype = args.case
        print(json.dumps(measure_here(ENGINES[engine], args.threads, Path(args.workdir), dtype,
                                      torch_threads=engine != "lean")))
        return 0
    sections = ["# Benchmarks", ""]
    if not args.shapes_only:
        sections.append(run_smollm2(args.threads))
        from minicpm.bench.perplexity import perplexity_bench, perplexity_section

        print("running perplexity (llama.cpp protocol) ...", file=sys.stderr)
        sections.append(perplexity_section(perplexity_bench(threads=args.threads)))
    from minicpm import bench

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    sections.append(bench.bench(args.full, args.threads, args.preset, workdir=args.keep, log=log))
    if not args.no_serving and not args.preset:
        from serving import run_serving  # benchmarks/serving.py

        sections.append(run_serving(["smollm2", "1b"], [1, 4, 16], threads=args.threads, log=log))
    if not args.no_eval_tasks and not args.preset and not args.shapes_only:
        from eval_tasks import run_eval_tasks  # benchmarks/eval_tasks.py

        sections.append(run_eval_tasks(threads=args.threads, log=log))
    if not args.no_vision and not args.preset and not args.shapes_only:
        from vision import run_vision  # benchmarks/vision.py

        sections.append(run_vision(threads=args.threads, peer_python=os.environ.get("MINICPMV_PEER_PYTHON"),
                                   peer_code=os.environ.get("MINICPMV_PEER_CODE"), log=log))
    if not args.no_training and not args.preset and not args.shapes_only:
        from training import run_training  # benchmarks/training.py

        sections.append(run_training(threads=args.threads, log=log))
    text = "\n".join(sections)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def run_smollm2(threads: int) -> str:
    with tempfile.TemporaryDirectory(prefix="minicpm-bench-") as tmp:
        workdir = Path(tmp)
        print("preparing weights ...", file=sys.stderr)
        prepare(workdir)
        rows = []
        for dtype in (SHIPPED, "float32", "bfloat16"):
            for engine in ENGINES:
                if (engine == "transformers" and dtype == SHIPPED) or (engine == "lean" and dtype != SHIPPED):
                    continue  # transformers would dequantize the file (the float rows); lean runs GGUF blocks only
                print(f"running {engine} {dtype} ...", file=sys.stderr)
                rows.append((engine, dtype, run_case(workdir, engine, dtype, threads)))
        return smollm2_table(rows, threads)


if __name__ == "__main__":
    sys.exit(main())
