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
    from minicpm.evaluation.ppl import (
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
                        batch_size=args.batch_size, limit=args.limit, kv_cache=args.kv_cache,
                        prefill_chunk=args.prefill_chunk)
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
                  "first_scored_position": first_scored(args.protocol, result.seqlen),
                  "kv_cache": args.kv_cache, "prefill_chunk": args.prefill_chunk if args.kv_cache else None},
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
    """`minicpm eval tasks`: the task files are read (and checked) before the model loads."""
    from minicpm.cli.verbs import _load
    from minicpm.evaluation.results import (
        RunReport,
        describe_model,
        format_table,
        sha256_file,
        write_records,
        write_report,
    )
    from minicpm.evaluation.task_runner import evaluate as evaluate_tasks
    from minicpm.evaluation.taskfile import load_task

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise MiniCPMError("--tasks names no task")
    loaded = [load_task(name) for name in names]
    model, tokenizer = _load(args)
    results = evaluate_tasks(model, tokenizer, loaded, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.batch_size, seed=args.seed)
    rows = [(r.task, metric, value, "-" if r.stderr[metric] is None else f"±{r.stderr[metric]:.4f}", r.n)
            for r in results for metric, value in r.metrics.items()]
    print(format_table(["task", "metric", "value", "stderr", "n"], rows))
    out_dir = Path(args.output) if args.output else Path("eval-results") / "tasks"
    report = RunReport(
        command="tasks", model=describe_model(model, args.model),
        data={r.task: {"source": r.source, "items": r.n,
                       "files": [{"path": f, "sha256": sha256_file(f)} for f in r.data_files]}
              for r in results},
        settings={"tasks": names, "num_fewshot": {r.task: r.num_fewshot for r in results},
                  "limit": args.limit, "batch_size": args.batch_size, "seed": args.seed,
                  "kv_cache": args.kv_cache},
        numbers={r.task: {"kind": r.kind, "n": r.n, "metrics": r.metrics, "stderr": r.stderr}
                 for r in results},
        timings={key: value for r in results
                 for key, value in ((f"{r.task}_seconds", r.seconds), (f"{r.task}_items_per_s", r.items_per_second))})
    path = write_report(report, out_dir)
    if args.output:
        for r in results:
            write_records(r.samples, out_dir, r.task)
    print(f"results: {path}" + (f" (per-sample records: {out_dir}/samples_<task>.jsonl)" if args.output else ""))
    return 0


def longctx(args: argparse.Namespace) -> int:
    """Sweep length x depth, print the accuracy and timing tables, write results.json and the
    heatmap PNG (plus per-sample records with --output)."""
    import sys

    from minicpm.cli.verbs import _load, served_name
    from minicpm.evaluation import haystacks, results
    from minicpm.evaluation import longctx as lc

    lc.check_task(args.task)  # input errors before the model loads
    lengths = lc.parse_lengths(args.lengths) if args.lengths else None
    depths = lc.parse_depths(args.depths) if args.depths else None
    model, tokenizer = _load(args)
    result = lc.run_longctx(model, tokenizer, args.task, lengths, depths, samples=args.samples, seed=args.seed,
                            template=args.template, prefill_chunk=args.prefill_chunk, limit=args.limit,
                            max_new_tokens=args.max_new_tokens)
    print(f"{args.task} accuracy (%), {result.samples} prompt(s) per cell:")
    print(result.table())
    print()
    print(result.timing_table())
    print("peak RSS is the process's peak so far (VmHWM), lengths run shortest first")
    out_dir = Path(args.output or Path("eval-results") / "longctx")
    data = {"task": args.task, "generator": "InfiniteBench-style, seeded", "seed": args.seed,
            "prompts_sha256": result.prompts_sha256}
    if args.task == "niah":
        data.update(haystack=haystacks.NIAH_HAYSTACK.name, haystack_lines=haystacks.NIAH_LINES,
                    haystack_sha256=results.sha256_file(haystacks.NIAH_HAYSTACK))
    settings = {"template": result.template, "lengths": result.lengths, "depths": result.depths,
                "samples": result.samples, "max_new_tokens": result.max_new_tokens, "kv_cache": result.kv_cache,
                "prefill_chunk": result.prefill_chunk, "decoding": "greedy", "limit": args.limit,
                "model_context": result.context}
    report = results.RunReport("longctx", results.describe_model(model, args.model), data, settings,
                               result.numbers(), timings={"seconds": result.seconds})
    name = served_name(args.model)
    paths = [results.write_report(report, out_dir),
             lc.plot_heatmap(result, out_dir / "heatmap.png", f"{name}: {args.task}")]
    if args.output:  # per-sample records only on request, as for every eval command
        paths.append(results.write_records((vars(r) for r in result.records), out_dir, f"longctx_{args.task}"))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
