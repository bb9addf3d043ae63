"""The work behind each `minicpm` verb; every verb is a thin layer over a library function."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minicpm.cli.options import LEAN_KV_CACHE_CHOICES
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
    decoder(model).kv_cache_dtype = getattr(args, "kv_cache", None) or "auto"
    return model, tokenizer


def decoder(model):
    """The language model that generates: a MiniCPM-V model's `llm`, else the model itself."""
    from minicpm.vision import MiniCPMV

    return model.llm if isinstance(model, MiniCPMV) else model


def chat(args: argparse.Namespace) -> int:
    from minicpm.cli.options import sampling_kwargs
    from minicpm.cli.repl import chat_loop

    system = with_context_file(args.system, args.context_file)
    session = lean_conversation(args, system)
    if session is not None:  # no PyTorch in this process
        return chat_loop(session, sampling_kwargs(args))
    from minicpm.cli.conversations import conversation
    from minicpm.vision import MiniCPMV
    from minicpm.vision.chat import SAMPLING_DEFAULTS

    if args.prompt_cache:  # before the model loads: a chat must not end unable to save
        from minicpm.generation.saved_cache import check_cache_path

        check_cache_path(args.prompt_cache)
    model, tokenizer = _load(args)
    session = conversation(model, tokenizer, system, args.image, progress=encoding_progress())
    if args.prompt_cache:
        if isinstance(model, MiniCPMV):
            raise MiniCPMError("--prompt-cache keeps a text conversation; MiniCPM-V's image prompts are not saved")
        open_prompt_cache(session, args.prompt_cache, prime=args.context_file is not None)
    defaults = SAMPLING_DEFAULTS if isinstance(model, MiniCPMV) else None  # MiniCPM-V's chat settings
    code = chat_loop(session, sampling_kwargs(args, defaults))
    if args.prompt_cache and session.prompt_cache.ids:
        save_and_say(session, args.prompt_cache)
    return code


def lean_conversation(args: argparse.Namespace, system: str | None):
    """A conversation on the lean runtime (minicpm.lean) where --runtime lets it run this
    checkpoint with these options; else None (--runtime lean: an error saying why not)."""
    head = args.head
    lean_only = [flag for flag, given in ((f"--head {head}", head != "stored"),
                                          (f"--kv-cache {args.kv_cache}", args.kv_cache in LEAN_KV_CACHE_CHOICES))
                 if given]
    if args.runtime == "torch":
        if lean_only:
            raise MiniCPMError(f"{lean_only[0]} runs on the lean runtime only (--runtime auto or lean)")
        return None
    if args.threads is not None and args.threads < 1:  # before anything is built or read
        raise MiniCPMError(f"--threads must be >= 1, got {args.threads}")
    from minicpm import lean
    from minicpm.loading import locate

    needs_torch = [flag for flag, given in (
        ("--dtype", args.dtype), ("--image", args.image), ("--prompt-cache", args.prompt_cache),
        ("--device", args.device not in (None, "cpu")),
        ("a GPU", args.device is None and Path("/dev/nvidia0").exists())) if given]
    path = locate(args.model)
    reason = f"{needs_torch[0]} needs the PyTorch runtime" if needs_torch else lean.why_not(path)
    if reason is not None:
        if args.runtime == "lean" or lean_only:
            option = "--runtime lean" if args.runtime == "lean" else f"{lean_only[0]} (lean runtime only)"
            raise MiniCPMError(f"{option} cannot run {path.name}: {reason}")
        return None
    model, tokenizer = lean.load(path, threads=args.threads, kv_cache=args.kv_cache or "auto", head=head)
    return lean.LeanChat(model, tokenizer, system)


def with_context_file(system: str | None, context_file: str | None) -> str | None:
    """The system message with the --context-file document after it."""
    if context_file is None:
        return system
    try:
        document = Path(context_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MiniCPMError(f"--context-file {context_file}: {e}") from None
    return f"{system}\n\n{document}" if system else document


def open_prompt_cache(session, path: str, prime: bool) -> None:
    """Load PATH into the session if it exists; prefill the system message (and save) if asked."""
    from minicpm.generation.saved_cache import load_prompt_cache

    if Path(path).exists():
        session.use_prompt_cache(load_prompt_cache(decoder(session.model), path))
        print(f"prompt cache: {len(session.prompt_cache.ids)} tokens loaded from {path}", file=sys.stderr)
    if prime:
        start = time.perf_counter()
        ran = session.prime()
        print(f"context: {ran} tokens prefilled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if ran:
            save_and_say(session, path)


def save_and_say(session, path: str) -> None:
    from minicpm.generation.saved_cache import save_prompt_cache

    count = save_prompt_cache(session.prompt_cache, decoder(session.model), path)
    print(f"prompt cache: {count} tokens saved to {path}", file=sys.stderr)


def encoding_progress():
    """A progress(done, total) callback that shows a bar on stderr while an image of more than
    one slice goes through the vision tower."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if total <= 1:
            return
        if bar is None or done == 0:
            bar = tqdm(total=total, desc="encoding image", unit="slice", file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def generate(args: argparse.Namespace) -> int:
    from minicpm.cli.options import sampling_kwargs
    from minicpm.vision import load_image

    prompts = args.prompt or read_prompts(Path(args.prompt_file))
    if args.batch_size < 1:
        raise MiniCPMError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image is not None and args.raw:
        raise MiniCPMError("--raw cannot be combined with --image: the image goes into the chat layout")
    image = None if args.image is None else load_image(args.image)  # a bad file fails before loading
    model, tokenizer = _load(args)
    kwargs = sampling_kwargs(args)
    if image is not None:
        replies = image_replies(model, tokenizer, image, prompts, kwargs)
    else:
        replies = text_replies(model, tokenizer, prompts, kwargs, args.raw, args.batch_size)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for prompt, text in zip(prompts, replies):
            if out:
                out.write(json.dumps({"prompt": prompt, "response": text}, ensure_ascii=False) + "\n")
            else:
                print(text if len(prompts) == 1 else f"### {prompt}\n{text}\n", flush=True)
    finally:
        if out:
            out.close()
    return 0


def text_replies(model, tokenizer, prompts: list[str], kwargs: dict, raw: bool, batch_size: int):
    """Replies to prompts, `batch_size` decoded together, in order."""
    from minicpm.generation.chat import chat_params
    from minicpm.generation.sampling import SamplingParams
    from minicpm.generation.text import generate_texts

    encoded = [tokenizer.encode(p) if raw else
               tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in prompts]
    for start in range(0, len(prompts), batch_size):
        batch = encoded[start:start + batch_size]
        if raw:
            params = SamplingParams.from_kwargs(**kwargs)
        else:  # the official chat settings: reply cut at role markers, max_length 4096
            params = chat_params(max(map(len, batch)), model.config.max_position_embeddings, **kwargs)
        yield from generate_texts(model, tokenizer, batch, params)


def image_replies(model, tokenizer, image, prompts: list[str], kwargs: dict):
    """Replies of a MiniCPM-V model to prompts about one image, one prompt at a time (the image
    is encoded once; each prompt reuses the cached prompt up to its own text)."""
    from minicpm.generation.chat import TEXT_ONLY
    from minicpm.vision import MiniCPMV
    from minicpm.vision.chat import stream_chat

    if not isinstance(model, MiniCPMV):
        raise MiniCPMError(TEXT_ONLY)
    progress = encoding_progress()

    def replies():
        for prompt in prompts:
            msgs = [{"role": "user", "content": prompt}]
            yield "".join(stream_chat(model, tokenizer, image, msgs, progress=progress, **kwargs)).strip()

    return replies()


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
    from minicpm.serving.images import ImageLimits
    from minicpm.serving.server import listening_socket
    from minicpm.serving.server import serve as run_server

    listening_socket(args.host, args.port).close()  # a taken port fails before the model loads
    for flag in ("max_batch", "prefill_chunk", "max_images", "max_image_bytes", "max_image_pixels"):
        if getattr(args, flag) < 1:
            raise MiniCPMError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model, tokenizer = _load(args)
    context = decoder(model).config.max_position_embeddings
    if args.context is not None and not 2 <= args.context <= context:
        raise MiniCPMError(f"--context must be in [2, {context}] (the model's context), got {args.context}")
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, context=args.context, prefix_cache=not args.no_prefix_cache)
    name = args.served_model_name or served_name(args.model)
    run_server(engine, tokenizer, name, host=args.host, port=args.port,
               api_key=args.api_key or os.environ.get("MINICPM_API_KEY") or None, log_level=args.log_level,
               image_limits=ImageLimits(args.max_images, args.max_image_bytes, args.max_image_pixels,
                                        args.allow_remote_images))
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
                      overwrite=args.force, progress=sys.stderr.isatty(), bits=args.bits,
                      group_size=args.group_size, sym=args.sym)
    print(f"wrote {out} ({args.to}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def quantize(args: argparse.Namespace) -> int:
    from minicpm.formats.quantized import quantize_checkpoint

    started = time.perf_counter()
    out = quantize_checkpoint(args.src, args.out, bits=args.bits, group_size=args.group_size,
                              head=args.head, overwrite=args.force, embedding=args.embedding,
                              vision=args.vision, method=args.method, sym=args.sym, act_order=args.act_order,
                              mse=args.mse,
                              calib=args.calib, samples=args.samples, seqlen=args.seqlen)
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
