"""`minicpm eval ppl|tasks|longctx`: the options (argparse only, so `--help` answers at once).
The work is in cli/evaluate.py over minicpm.evaluation."""

from __future__ import annotations

import argparse

from minicpm.cli.options import KV_CACHE_CHOICES, add_kv_cache_arg, add_model_args


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a model: perplexity, benchmark tasks, long-context retrieval")
    kinds = p.add_subparsers(dest="eval_command", metavar="<ppl|tasks|longctx>", required=True)
    add_ppl_args(kinds.add_parser("ppl", help="perplexity of a text (WikiText-2 built in)"))
    add_tasks_args(kinds.add_parser("tasks", help="multiple-choice and generation tasks from YAML task files"))
    add_longctx_args(kinds.add_parser("longctx", help="passkey / number_string / kv_retrieval and "
                                                      "needle-in-a-haystack sweeps"))


def add_common_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--output", default=None,
                   help="folder for results.json and per-sample records (default: results.json only "
                        "in ./eval-results/<command>)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items / windows")


def add_ppl_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--data", default="wikitext2",
                   help="text file, or wikitext2 / wikitext2-valid (built in; default wikitext2 = test split)")
    p.add_argument("--protocol", choices=("minicpm", "llama.cpp"), default="minicpm",
                   help="minicpm: non-overlapping windows, all tokens scored (the official quantize_eval); "
                        "llama.cpp: llama-perplexity's chunks, second half scored (default minicpm)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length in tokens (default 2048 for minicpm, 512 for llama.cpp)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default=None,
                   help="run each window as a prefill through a KV cache of this kind (auto, int8, int4), "
                        "--prefill-chunk tokens at a time, to measure what a quantized cache costs "
                        "(default: one pass per window, no cache)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="with --kv-cache: tokens per forward pass (default 512)")


def add_tasks_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    add_kv_cache_arg(p)
    p.add_argument("--tasks", required=True,
                   help="comma-separated built-in task names or paths to task files (.yaml)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="requests scored together (default 8)")
    p.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling (default 1234)")


def add_longctx_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    add_kv_cache_arg(p)
    p.add_argument("--task", default="passkey", help="passkey, number_string, kv_retrieval or niah (default passkey)")
    p.add_argument("--lengths", default=None,
                   help="context lengths in tokens of the model's tokenizer, k = 1024, e.g. 1k,2k,4k "
                        "(default: powers of two from 1k up to the model's context)")
    p.add_argument("--depths", default=None,
                   help="needle depths in [0, 1], 0 = start of the context (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=int, default=1, help="seeded prompts per (length, depth) cell (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated haystacks (default 0)")
    p.add_argument("--template", choices=("completion", "chat"), default="completion",
                   help="completion: InfiniteBench's completion prompts, ending 'The pass key is' (default); "
                        "chat: its chat prompts through the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer budget (default InfiniteBench's: passkey 6, number_string 12, "
                        "kv_retrieval 50; niah 48)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass (default 512)")
