"""`minicpm <verb>`: the command line.

Only argparse is imported at the top so that `minicpm --help` answers at once; each verb
imports what it needs. Errors caused by input print one line (`error: ...`) and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_new_tokens")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--kv-cache", choices=("auto", "int8"), default="auto",
                   help="KV cache precision: the model's dtype, or int8 (half the memory)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    out = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    out["stop"] = args.stop
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicpm", description="Run, convert and inspect MiniCPM-family language models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")

    p = sub.add_parser("chat", help="interactive streaming chat (/reset, /exit)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.3, top_p=0.8)
    p.add_argument("--system", default=None, help="system message for the conversation")

    p = sub.add_parser("generate", help="complete prompts (one per line of a file, or --prompt)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0, top_p=1.0)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompt-file", help="file with one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--raw", action="store_true", help="feed prompts as plain text, without the chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--output", help="write JSONL {prompt, response} here instead of printing")

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
    p.add_argument("--kv-cache", choices=("auto", "int8"), default="auto",
                   help="KV cache precision: the model's dtype, or int8 (half the memory)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")

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
    p.add_argument("--to", required=True, choices=["hf", "llama", "gguf"],
                   help="hf: MiniCPM format; llama: scalings folded in (LlamaForCausalLM); gguf: llama.cpp")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (default: as loaded)")
    p.add_argument("--type", default="f16", help="GGUF tensor type: f32, f16, bf16, q8_0, q4_0, q4_k_m "
                   "(llama.cpp's Q4_K_M mix), q6_k (default f16)")
    p.add_argument("--force", action="store_true", help="replace an existing output")

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 checkpoint (round-to-nearest)")
    p.add_argument("src", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group: 32, 64 or 128 (default 128)")
    p.add_argument("--head", default="int8", help="int8 (default) or bf16: keep the head as stored")
    p.add_argument("--embedding", default="head",
                   help="head (default): a tied embedding reads the int8 head's table; float: keep its own")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    add_training_parsers(sub)
    return parser


TRAIN_EXAMPLES = {
    "pretrain": "example:\n  minicpm train pretrain model.tokenizer=tok data.train=packed data.valid=packed-valid \\\n"
                "    'model.config={hidden_size: 256, intermediate_size: 640, num_hidden_layers: 4, "
                "num_attention_heads: 4, scale_emb: 12, dim_model_base: 64, scale_depth: 1.4}' train.steps=1000 "
                "--out runs/tiny\n  minicpm train pretrain --print-recipe    # every setting and its default",
    "sft": "example:\n  minicpm train sft model.path=MODEL data.train=chats.json train.method=lora --out runs/sft\n"
           "  minicpm merge MODEL runs/sft/final merged",
    "dpo": "example:\n  minicpm train dpo model.path=MODEL data.train=pairs.json dpo.beta=0.1 --out runs/dpo",
}


def add_training_parsers(sub) -> None:
    """`minicpm train <recipe>`, `minicpm pack` and `minicpm merge`."""
    p = sub.add_parser("train", help="pretrain, fine-tune (full, LoRA, QLoRA), DPO, or train a tokenizer")
    recipes = p.add_subparsers(dest="recipe", metavar="<recipe>", required=True)
    for name, what in (("pretrain", "pretrain from packed shards: muP, WSD or cosine, exact resume"),
                       ("sft", "supervised fine-tuning on chat data: full, LoRA or QLoRA"),
                       ("dpo", "direct preference optimisation on chosen/rejected pairs")):
        r = recipes.add_parser(name, help=what, description=f"{what}. See docs/training.md.",
                               epilog=TRAIN_EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        r.add_argument("overrides", nargs="*", metavar="key=value",
                       help="recipe settings, dotted for nested ones (e.g. optim.lr=0.01 schedule.kind=cosine)")
        r.add_argument("--recipe", dest="recipe_file", default=None, help="YAML recipe; overrides apply on top (default: built-in)")
        r.add_argument("--out", default=None, help="run directory (default: the recipe's out)")
        r.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
        r.add_argument("--print-recipe", action="store_true", help="print the full recipe and exit")
    r = recipes.add_parser("tokenizer", help="train a BPE tokenizer (byte fallback) in the Hugging Face layout")
    r.add_argument("files", nargs="+", help="text files, or JSONL with a text field")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000)")
    r.add_argument("--text-field", default="text", help="field of JSONL records holding text (default text)")
    r.add_argument("--force", action="store_true", help="replace an existing output")

    p = sub.add_parser("pack", help="tokenize text/JSONL into packed memory-mapped shards for pretraining")
    p.add_argument("files", nargs="+", help="text files, or JSONL with a text field")
    p.add_argument("--tokenizer", required=True, help="checkpoint or tokenizer directory (or .gguf) to tokenize with")
    p.add_argument("--out", required=True, help="output directory of shards (rerun to resume)")
    p.add_argument("--text-field", default="text", help="field of JSONL records holding text (default text)")
    p.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file (default 2^26)")
    p.add_argument("--on-bad", choices=("skip", "error"), default="skip",
                   help="a bad JSONL record is reported and skipped (default) or stops the run")

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (fp32), checked against the adapter")
    p.add_argument("base", help="base checkpoint directory or .gguf")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # recipe overrides (key=value) may come before or after the options
    if extra and getattr(args, "overrides", None) is not None and all("=" in a and not a.startswith("-")
                                                                      for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from minicpm import __version__

        print(__version__)
        return 0
    if not args.verb:
        parser.print_help()
        return 0
    from minicpm.errors import MiniCPMError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
            return run_verb(args)
    except (MiniCPMError, OSError) as e:  # bad input, or a file we cannot read or write
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def run_verb(args: argparse.Namespace) -> int:
    from minicpm.cli import verbs

    return getattr(verbs, args.verb)(args)


if __name__ == "__main__":
    sys.exit(main())
