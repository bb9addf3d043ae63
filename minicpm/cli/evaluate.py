"""The work behind `minicpm eval ppl|tasks|longctx`: load the model, run the measurement from
minicpm.evaluation, print its table and write results.json (plus per-sample records with
--output)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from minicpm.errors import MiniCPMError


def evaluate(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise MiniCPMError(f"--limit must be >= 1, got {args.limit}")
    return {"ppl": ppl, "tasks": tasks, "longctx": longctx}[args.eval_command](args)


def ppl(args: argparse.Namespace) -> int:
    from minicpm.cli.verbs import _load
    from minicpm.evaluation.perplexity import (
        bos_per_window,
        encode_text,
        first_scored,
        perplexity,
        read_data,
    )
    from minicpm.evaluation.results import (
        RunReport,
        describe_model,
        format_table,
        sha256_text,
        write_records,
        write_report,
    )

    data = read_data(args.data, args.protocol)  # a bad file fails before the model loads
    start = time.perf_counter()
    model, tokenizer = _load(args)
    loaded = time.perf_counter()
    ids = encode_text(tokenizer, data.text)
    tokenized = time.perf_counter()
    result = perplexity(model, tokenizer, ids, protocol=args.protocol, seqlen=args.seqlen,
                        batch_size=args.batch_size, limit=args.limit)
    print(format_table(
        ["data", "protocol", "seqlen", "windows", "tokens scored", "ppl", "±", "tokens/s"],
        [[data.name, result.protocol, result.seqlen, result.n_windows, result.n_tokens_scored,
          result.ppl, f"±{result.uncertainty:.4f}", f"{result.tokens_per_second:.1f}"]]))
    report = RunReport(
        command="ppl", model=describe_model(model, args.model),
        data={"name": data.name, "path": str(data.path), "form": data.form,
              "sha256": sha256_text(data.text), "characters": len(data.text), "tokens": len(ids)},
        settings={"protocol": result.protocol, "seqlen": result.seqlen, "batch_size": args.batch_size,
                  "limit": args.limit, "dtype": args.dtype, "device": str(model.device),
                  "threads": args.threads, "bos_per_window": bos_per_window(args.protocol, tokenizer),
                  "first_scored_position": first_scored(args.protocol, result.seqlen)},
        numbers=result.summary(),
        timings={"load_seconds": loaded - start, "tokenize_seconds": tokenized - loaded,
                 "score_seconds": result.seconds, "tokens_per_second": result.tokens_per_second})
    out_dir = Path(args.output or "eval-results/ppl")
    path = write_report(report, out_dir)
    if args.output:
        first = first_scored(args.protocol, result.seqlen)
        write_records(window_records(result, first, ids, tokenizer), out_dir, "ppl")
    print(f"results: {path}")
    return 0


def window_records(result, first: int, ids: list[int], tokenizer) -> list[dict]:
    """One record per window: where it lies in the token stream, its score, how it begins."""
    records = []
    for i, nll in enumerate(result.window_nlls):
        start = i * result.seqlen
        records.append({"window": i, "token_start": start, "token_end": start + result.seqlen,
                        "scored_from": start + first + 1, "tokens_scored": result.seqlen - 1 - first,
                        "mean_nll": nll, "ppl": math.exp(nll),
                        "text_start": tokenizer.decode(ids[start:start + 32])})
    return records


def tasks(args: argparse.Namespace) -> int:
    raise MiniCPMError("minicpm eval tasks: not built yet")


def longctx(args: argparse.Namespace) -> int:
    raise MiniCPMError("minicpm eval longctx: not built yet")
