"""The command-line surface of training: the arguments of `minicpm train <recipe>`, `minicpm pack`
and `minicpm merge`, and parsing with `key=value` recipe overrides.

The `minicpm` CLI and `python -m minicpm.training.run` (the torchrun entry point) both build
their parsers from here, so the two accept exactly the same arguments. Only argparse is imported
at the top: `minicpm --help` must answer at once.
"""

from __future__ import annotations

import argparse

TRAIN_EXAMPLES = {
    "pretrain": "example:\n  minicpm train pretrain model.tokenizer=tok data.train=packed "
                "data.valid=packed-valid \\\n"
                "    'model.config={hidden_size: 256, intermediate_size: 640, "
                "num_hidden_layers: 4, num_attention_heads: 4, scale_emb: 12, dim_model_base: 64, "
                "scale_depth: 1.4}' "
                "train.steps=1000 --out runs/tiny\n"
                "  minicpm train pretrain --print-recipe    # every setting and its default",
    "sft": "example:\n  minicpm train sft model.path=MODEL data.train=chats.json train.method=lora "
           "--out runs/sft\n  minicpm merge MODEL runs/sft/final merged",
    "dpo": "example:\n  minicpm train dpo model.path=MODEL data.train=pairs.json dpo.beta=0.1 "
           "--out runs/dpo",
}
RECIPES = (("pretrain", "pretrain from packed shards: muP, WSD or cosine, exact resume"),
           ("sft", "supervised fine-tuning on chat data: full, LoRA or QLoRA"),
           ("dpo", "direct preference optimisation on chosen/rejected pairs"))


def add_training_parsers(sub) -> None:
    """`minicpm train <recipe>`, `minicpm pack` and `minicpm merge`."""
    add_train_parser(sub)
    p = sub.add_parser("pack", help="tokenize text/JSONL into packed memory-mapped shards for "
                                    "pretraining")
    p.add_argument("files", nargs="+", help="text files, or JSONL with a text field")
    p.add_argument("--tokenizer", required=True,
                   help="checkpoint or tokenizer directory (or .gguf) to tokenize with")
    p.add_argument("--out", required=True, help="output directory of shards (rerun to resume)")
    p.add_argument("--text-field", default="text",
                   help="field of JSONL records holding text (default text)")
    p.add_argument("--shard-tokens", type=int, default=2**26,
                   help="tokens per shard file (default 2^26)")
    p.add_argument("--on-bad", choices=("skip", "error"), default="skip",
                   help="a bad JSONL record is reported and skipped (default) or stops the run")

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (fp32), checked "
                                     "against the adapter")
    p.add_argument("base", help="base checkpoint directory or .gguf")
    p.add_argument("adapter",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--dtype", default=None,
                   help="dtype of the written weights (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def add_train_parser(sub) -> None:
    """`minicpm train <pretrain|sft|dpo|tokenizer>`."""
    p = sub.add_parser("train", help="pretrain, fine-tune (full, LoRA, QLoRA), DPO, or train a "
                                     "tokenizer")
    recipes = p.add_subparsers(dest="recipe", metavar="<recipe>", required=True)
    for name, what in RECIPES:
        r = recipes.add_parser(name, help=what, description=f"{what}. See docs/training.md.",
                               epilog=TRAIN_EXAMPLES[name],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        r.add_argument("overrides", nargs="*", metavar="key=value",
                       help="recipe settings, dotted for nested ones "
                            "(e.g. optim.lr=0.01 schedule.kind=cosine)")
        r.add_argument("--recipe", dest="recipe_file", default=None,
                       help="YAML recipe; overrides apply on top (default: built-in)")
        r.add_argument("--out", default=None, help="run directory (default: the recipe's out)")
        r.add_argument("--resume", action="store_true",
                       help="continue from the run directory's last checkpoint")
        r.add_argument("--print-recipe", action="store_true",
                       help="print the full recipe and exit")
        r.add_argument("--dry-run", action="store_true",
                       help="load the model and data, print the plan (parameters, tokens per "
                            "step, memory by phase) and exit without training or writing")
        r.add_argument("--profile-memory", action="store_true",
                       help="measure the resident memory of each phase (weights, data, the "
                            "first step's forward, loss, backward and optimizer, later steps) "
                            "and print and log it at the end")
    r = recipes.add_parser("tokenizer", help="train a BPE tokenizer (byte fallback) in the "
                                             "Hugging Face layout")
    r.add_argument("files", nargs="+", help="text files, or JSONL with a text field")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--vocab-size", type=int, default=32000,
                   help="vocabulary size (default 32000)")
    r.add_argument("--text-field", default="text",
                   help="field of JSONL records holding text (default text)")
    r.add_argument("--force", action="store_true", help="replace an existing output")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that recipe overrides (key=value) may come before or after
    the options."""
    args, extra = parser.parse_known_args(argv)
    overrides = extra and getattr(args, "overrides", None) is not None
    if overrides and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
