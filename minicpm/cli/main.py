"""`minicpm <verb>`: the command line.

Only argparse (and the argparse-only option modules: cli/options.py, cli/eval_options.py and
training/command_line.py for train/pack/merge) is imported at the top so that `minicpm --help`
answers at once; each verb (cli/verbs.py) imports what it needs. Errors caused by input print
one line (`error: ...`) and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from minicpm.cli.eval_options import add_eval_parser
from minicpm.cli.options import add_kv_cache_arg, add_model_args, add_sampling_args
from minicpm.errors import run_reporting_errors
from minicpm.kernels.allocator import apply_heap_policy
from minicpm.training.command_line import add_training_parsers, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicpm", description="Run, convert and inspect MiniCPM-family language models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")

    p = sub.add_parser("chat", help="interactive streaming chat (/reset, /image PATH, /exit)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.3, top_p=0.8,
                      vision_note="; MiniCPM-V: its chat's temperature 0.7, top-p 0.8, top-k 100, "
                                  "repetition penalty 1.05", lean=True)
    p.add_argument("--system", default=None, help="system message for the conversation")
    p.add_argument("--image", default=None, help="an image to talk about (MiniCPM-V; /image PATH changes it)")
    p.add_argument("--context-file", default=None, metavar="FILE",
                   help="a text document the conversation is about: it goes into the system message and is "
                        "prefilled before the first question")
    p.add_argument("--prompt-cache", default=None, metavar="PATH",
                   help="keep the conversation's KV cache in PATH: loaded at the start if PATH exists (refused if "
                        "another model or KV cache kind made it), saved when the chat ends and after --context-file "
                        "is prefilled")
    p.add_argument("--runtime", choices=("auto", "lean", "torch"), default="auto",
                   help="lean: quantized GGUF files on the native kernels without PyTorch (a third of the memory); "
                        "torch: the PyTorch model (every checkpoint, --dtype, --image, --prompt-cache, "
                        "GPUs); auto (default): lean where it can run the checkpoint and options, else torch")
    p.add_argument("--head", choices=("stored", "int4"), default="stored",
                   help="the output head as the file stores it, or int4: rounded again to int4 groups of 32 at "
                        "load (about half a Q6_K head's memory; lean runtime only)")

    p = sub.add_parser("generate", help="complete prompts (one per line of a file, or --prompt)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0, top_p=1.0)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompt-file", help="file with one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--raw", action="store_true", help="feed prompts as plain text, without the chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--output", help="write JSONL {prompt, response} here instead of printing")
    p.add_argument("--image", default=None,
                   help="an image every prompt asks about (MiniCPM-V; prompts then run one at a time)")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MINICPM_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: from the path)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those (default 64)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per request, prompt + reply (default: the model's context length)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per forward pass (default 256)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (default: a chat's next turn reuses the slot that holds its "
                        "history, whole prefill chunks of it)")
    add_kv_cache_arg(p)
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    g = p.add_argument_group("images (MiniCPM-V)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (default: only inline data: URLs; fetching lets clients "
                        "make the server open connections)")
    g.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    g.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024,
                   help="encoded bytes per image (default 20 MiB)")
    g.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="width x height per image (default 50,000,000)")

    p = sub.add_parser("info", help="architecture, parameter count, dtype and memory of a model")
    add_model_args(p)

    p = sub.add_parser("bench", help="speed on random MiniCPM-1B weights vs llama.cpp and transformers")
    p.add_argument("--full", action="store_true", help="also the MiniCPM-2B shape (~5.5 GB in bf16)")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: up to 2)")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)  # e.g. tiny: checks the machinery

    p = sub.add_parser("convert", help="write a model in another format")
    p.add_argument("src", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("out", help="output directory (or .gguf file)")
    p.add_argument("--to", required=True, choices=["hf", "llama", "gguf", "gptq"],
                   help="hf: MiniCPM format; llama: scalings folded in (LlamaForCausalLM); gguf: llama.cpp; "
                   "gptq: GPTQ v1 (transformers/optimum, vLLM)")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (default: as loaded)")
    p.add_argument("--type", default="f16", help="GGUF tensor type: f32, f16, bf16, q8_0, q4_0, q4_k_m "
                   "(llama.cpp's Q4_K_M mix), q6_k (default f16)")
    p.add_argument("--bits", type=int, default=None, help="gptq, float source: 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="gptq, float source: columns per group, -1 for one per row (default 128)")
    p.add_argument("--sym", action="store_true", default=None,
                   help="gptq, float source: symmetric grid (zero point 2^(bits-1)); default asymmetric")
    p.add_argument("--force", action="store_true", help="replace an existing output")

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 checkpoint (round-to-nearest, GPTQ or AWQ)")
    p.add_argument("src", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "awq"),
                   help="rtn (default: round to nearest, no data), gptq or awq (calibrated, layer by layer)")
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group: 32, 64 or 128 (default 128)")
    p.add_argument("--sym", action="store_true", help="gptq/awq: symmetric int4 grid (zero point 8)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: visit columns by decreasing Hessian diagonal, with static groups (no runtime "
                   "permutation); default on")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: search each group's range for the least rounding error (the reference "
                   "quantizer's MSE grid); default on")
    p.add_argument("--calib", default=None,
                   help="gptq/awq calibration text: a UTF-8 file, wikitext2 (default; validation split) or alpaca")
    p.add_argument("--samples", type=int, default=None, help="gptq/awq: calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="gptq/awq: tokens per window (default 512)")
    p.add_argument("--head", default="int8",
                   help="int8 (default), int4 (groups of 32: least memory) or bf16 (kept as stored)")
    p.add_argument("--embedding", default="head",
                   help="head (default): a tied embedding reads the quantized head's table; float: keep its own")
    p.add_argument("--vision", default="bf16", choices=["bf16", "int8"],
                   help="MiniCPM-V: bf16 (default) keeps the vision tower and resampler as stored; "
                        "int8 quantizes the vision blocks' Linears")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    add_eval_parser(sub)
    add_training_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:  # first, before torch allocates anything; training's heap is "mid" (kernels/allocator.py)
        apply_heap_policy(default="mid" if words[:1] == ["train"] else "fast")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.version:
        from minicpm import __version__

        print(__version__)
        return 0
    if not args.verb:
        parser.print_help()
        return 0
    return run_reporting_errors(run_verb, args)


def run_verb(args: argparse.Namespace) -> int:
    if args.verb == "eval":
        from minicpm.cli.evaluate import evaluate

        return evaluate(args)
    from minicpm.cli import verbs

    return getattr(verbs, args.verb)(args)


if __name__ == "__main__":
    sys.exit(main())
