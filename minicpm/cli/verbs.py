"""The work behind each `minicpm` verb; every verb is a thin layer over a library function."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minicpm.errors import MiniCPMError


def _load(args: argparse.Namespace):
    import torch

    import minicpm

    if args.threads:
        if args.threads < 1:
            raise MiniCPMError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, tokenizer = minicpm.load(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise MiniCPMError(f"{args.model} has no tokenizer files; this verb needs one")
    model.kv_cache_dtype = getattr(args, "kv_cache", "auto")
    return model, tokenizer


def chat(args: argparse.Namespace) -> int:
    from minicpm.cli.options import sampling_kwargs
    from minicpm.cli.repl import chat_loop

    model, tokenizer = _load(args)
    return chat_loop(model, tokenizer, sampling_kwargs(args), system=args.system)


def generate(args: argparse.Namespace) -> int:
    from minicpm.cli.options import sampling_kwargs
    from minicpm.generation.chat import chat_params
    from minicpm.generation.sampling import SamplingParams
    from minicpm.generation.text import generate_texts

    prompts = args.prompt or read_prompts(Path(args.prompt_file))
    if args.batch_size < 1:
        raise MiniCPMError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, tokenizer = _load(args)
    kwargs = sampling_kwargs(args)
    encoded = [tokenizer.encode(p) if args.raw else
               tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in prompts]
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = encoded[start:start + args.batch_size]
            if args.raw:
                params = SamplingParams.from_kwargs(**kwargs)
            else:  # the official chat settings: reply cut at role markers, max_length 4096
                params = chat_params(max(map(len, batch)), model.config.max_position_embeddings, **kwargs)
            for prompt, text in zip(prompts[start:start + args.batch_size],
                                    generate_texts(model, tokenizer, batch, params)):
                if out:
                    out.write(json.dumps({"prompt": prompt, "response": text}, ensure_ascii=False) + "\n")
                else:
                    print(text if len(prompts) == 1 else f"### {prompt}\n{text}\n", flush=True)
    finally:
        if out:
            out.close()
    return 0


def read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MiniCPMError(f"cannot read prompt file {path}: {e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
                prompts.append(str(record["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MiniCPMError(f"{path}:{number}: JSON line without a 'prompt' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise MiniCPMError(f"{path} holds no prompts")
    return prompts


def serve(args: argparse.Namespace) -> int:
    import os

    from minicpm.serving.engine import Engine
    from minicpm.serving.server import listening_socket
    from minicpm.serving.server import serve as run_server

    listening_socket(args.host, args.port).close()  # a taken port fails before the model loads
    for flag in ("max_batch", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise MiniCPMError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model, tokenizer = _load(args)
    context = model.config.max_position_embeddings
    if args.context is not None and not 2 <= args.context <= context:
        raise MiniCPMError(f"--context must be in [2, {context}] (the model's context), got {args.context}")
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, context=args.context)
    name = args.served_model_name or served_name(args.model)
    run_server(engine, tokenizer, name, host=args.host, port=args.port,
               api_key=args.api_key or os.environ.get("MINICPM_API_KEY") or None, log_level=args.log_level)
    return 0


def served_name(model: str | None) -> str:
    """The id clients pass as "model": the checkpoint's folder or file name."""
    from minicpm.loading import DEFAULT_MODEL_NAME, names_default_model

    if names_default_model(model):
        return DEFAULT_MODEL_NAME
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def info(args: argparse.Namespace) -> int:
    from minicpm.formats.info import describe

    for key, value in describe(args.model).items():
        print(f"{key:>22}: {value}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from minicpm.bench import bench as run_bench

    text = run_bench(args.full, args.threads, args.preset, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


def convert(args: argparse.Namespace) -> int:
    from minicpm.formats.convert import convert as run_convert

    started = time.perf_counter()
    # --type: f32, f16, bf16, q8_0, q4_0, q4_k_m (llama.cpp's Q4_K_M mix), q6_k; checked by
    # run_convert before the model is loaded
    out = run_convert(args.src, args.out, to=args.to, dtype=args.dtype, gguf_type=args.type,
                      overwrite=args.force, progress=sys.stderr.isatty())
    print(f"wrote {out} ({args.to}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def quantize(args: argparse.Namespace) -> int:
    from minicpm.formats.quantized import quantize_checkpoint

    started = time.perf_counter()
    out = quantize_checkpoint(args.src, args.out, bits=args.bits, group_size=args.group_size,
                              head=args.head, overwrite=args.force, embedding=args.embedding,
                              method=args.method, sym=args.sym, act_order=args.act_order, calib=args.calib,
                              samples=args.samples, seqlen=args.seqlen)
    print(f"wrote {out} ({args.method} int{args.bits}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def train(args: argparse.Namespace) -> int:
    from minicpm.training.run import train_command

    return train_command(args)


def pack(args: argparse.Namespace) -> int:
    from minicpm.training.shards import pack_corpus

    summary = pack_corpus(args.files, args.tokenizer, args.out, text_field=args.text_field,
                          shard_tokens=args.shard_tokens, on_bad=args.on_bad)
    print(summary, file=sys.stderr)
    return 0


def merge(args: argparse.Namespace) -> int:
    from minicpm.training.lora import merge_adapter

    started = time.perf_counter()
    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0
