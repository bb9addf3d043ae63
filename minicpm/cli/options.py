"""Command-line options shared by several verbs: which model to load, and how to sample."""

from __future__ import annotations

import argparse

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                  "max_new_tokens")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, .gguf file or hub id (default: SmolLM2-135M-Instruct, "
                        "which 'default' or that name also names)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float,
                      vision_note: str = "", lean: bool = False) -> None:
    """The sampling flags; a flag not given takes the verb's default (`temperature`, `top_p`,
    the rest off) unless the model has its own (`vision_note` says MiniCPM-V's, if it does);
    `lean`: the verb may run on the lean runtime (its KV cache kinds too)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default {temperature}{vision_note})")
    g.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling mass (default {top_p})")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_kv_cache_arg(p, lean)
    p.set_defaults(sampling_defaults={"temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0,
                                      "repetition_penalty": 1.0})


def sampling_kwargs(args: argparse.Namespace, model_defaults: dict | None = None) -> dict:
    """The flags as given; those not given from `model_defaults` (a model's own, such as
    MiniCPM-V's chat settings), else the verb's defaults."""
    out = {**args.sampling_defaults, **(model_defaults or {})}
    for name in SAMPLING_FLAGS:
        value = getattr(args, name)
        if value is not None or name not in out:
            out[name] = value
    out["stop"] = args.stop
    return out


# minicpm.cache.KV_CACHE_DTYPES, spelled out so that --help needs no torch import (a test keeps
# the two equal)
KV_CACHE_CHOICES = ("auto", "int8", "int4")


LEAN_KV_CACHE_CHOICES = ("f16",)  # the lean runtime's too (llama.cpp's default cache)


def add_kv_cache_arg(p: argparse.ArgumentParser, lean: bool = False) -> None:
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES + (LEAN_KV_CACHE_CHOICES if lean else ()), default="auto",
                   help="KV cache precision: the model's dtype, int8 (about half of bf16's memory) "
                        "or int4 (about a third)" + ("; on the lean runtime auto is fp16, as llama.cpp's "
                                                     "(f16: the same, lean runtime only)" if lean else ""))
