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
    """`minicpm eval tasks`: the task files are read (and checked) before the model loads."""
    from pathlib import Path

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
    raise MiniCPMError("minicpm eval longctx: not built yet")
