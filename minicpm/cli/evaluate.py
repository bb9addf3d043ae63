"""The work behind `minicpm eval ppl|tasks|longctx`: load the model, run the measurement from
minicpm.evaluation, print its table and write results.json (plus per-sample records with
--output)."""

from __future__ import annotations

import argparse

from minicpm.errors import MiniCPMError


def evaluate(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise MiniCPMError(f"--limit must be >= 1, got {args.limit}")
    return {"ppl": ppl, "tasks": tasks, "longctx": longctx}[args.eval_command](args)


def ppl(args: argparse.Namespace) -> int:
    raise MiniCPMError("minicpm eval ppl: not built yet")


def tasks(args: argparse.Namespace) -> int:
    raise MiniCPMError("minicpm eval tasks: not built yet")


def longctx(args: argparse.Namespace) -> int:
    raise MiniCPMError("minicpm eval longctx: not built yet")
