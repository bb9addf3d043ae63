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
    """Sweep length x depth, print the accuracy and timing tables, write results.json and the
    heatmap PNG (plus per-sample records with --output)."""
    import sys
    from pathlib import Path

    from minicpm.cli.verbs import _load
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
        data.update(haystack=haystacks.NIAH_HAYSTACK.name,
                    haystack_sha256=results.sha256_file(haystacks.NIAH_HAYSTACK))
    settings = {"template": result.template, "lengths": result.lengths, "depths": result.depths,
                "samples": result.samples, "max_new_tokens": result.max_new_tokens, "kv_cache": result.kv_cache,
                "prefill_chunk": result.prefill_chunk, "decoding": "greedy", "limit": args.limit,
                "model_context": result.context}
    report = results.RunReport("longctx", results.describe_model(model, args.model), data, settings,
                               result.numbers(), timings={"seconds": result.seconds})
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    paths = [results.write_report(report, out_dir),
             lc.plot_heatmap(result, out_dir / "heatmap.png", f"{name}: {args.task}")]
    if args.output:  # per-sample records only on request, as for every eval command
        paths.append(results.write_records((vars(r) for r in result.records), out_dir, f"longctx_{args.task}"))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
