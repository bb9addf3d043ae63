"""Multiple-choice scoring speed: `minicpm eval tasks ocnli` against lm-eval's own `hf` backend.

The same OCNLI dev items (the first --limit of the 2950 with a gold label), the same prompt and
choices (lm-eval reads a YAML task written here from our built-in task: same template, same
choices, same gold index), the same weights (SmolLM2-135M-Instruct dequantized to float32: ours
from an HF folder, lm-eval's HFLM = transformers' LlamaForCausalLM on our llama-format export),
the same threads and batch size. Each engine runs in its own process; the model load is timed
apart from the scoring. Ours also runs on the shipped Q4_1 GGUF as stored. Reported: items/s and
acc / acc_norm of each.

    python benchmarks/eval_tasks.py --limit 200 --threads 2      (also a section of `make bench`)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from minicpm.bench.arguments import count  # noqa: E402
from minicpm.bench.machine import machine  # noqa: E402
from minicpm.bench.process import measure_here, run_child  # noqa: E402

LIMIT = 200
BATCH = 8
LMEVAL_TASK = "minicpm_ocnli_bench"


def lm_eval_yaml(data_file: Path) -> str:
    """Our built-in `ocnli` task file, written for lm-eval (its items pre-filtered to a file)."""
    import yaml

    from minicpm.evaluation.taskfile import BUILTIN

    ours = yaml.safe_load((BUILTIN / "ocnli.yaml").read_text(encoding="utf-8"))
    labels = sorted(ours["target_map"], key=ours["target_map"].get)
    return "\n".join([
        f"task: {LMEVAL_TASK}", "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data_file))}}}}}",
        "test_split: test", "output_type: multiple_choice",
        "doc_to_text: " + json.dumps(ours["prompt"], ensure_ascii=False),
        "doc_to_choice: " + json.dumps(ours["choices"], ensure_ascii=False),
        "doc_to_target: " + json.dumps("{{" + json.dumps(labels) + ".index(label)}}"),
        "target_delimiter: ' '",
        "metric_list: [{metric: acc}, {metric: acc_norm}]", ""])


def prepare(workdir: Path, limit: int) -> None:
    import minicpm
    from minicpm.evaluation import load_task
    from minicpm.formats.hf import checkpoint_state_dict, save_pretrained
    from minicpm.formats.llama import to_llama

    model, tokenizer = minicpm.load(dtype="float32")
    save_pretrained(model, tokenizer, workdir / "hf", overwrite=True)
    config, state = to_llama(model.config, checkpoint_state_dict(model))
    save_pretrained(None, tokenizer, workdir / "llama", config=config, state_dict=state, overwrite=True)
    items = load_task("ocnli").items[:limit]
    data = workdir / "ocnli_items.jsonl"
    data.write_text("".join(json.dumps(i.doc, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    (workdir / "tasks").mkdir(exist_ok=True)
    (workdir / "tasks" / f"{LMEVAL_TASK}.yaml").write_text(lm_eval_yaml(data), encoding="utf-8")


def bench_ours(workdir: Path, which: str, limit: int) -> dict:
    import minicpm
    from minicpm.evaluation import evaluate

    start = time.perf_counter()
    model, tokenizer = minicpm.load(str(workdir / "hf") if which == "float32" else None)
    load = time.perf_counter() - start
    evaluate(model, tokenizer, ["ocnli"], limit=4, batch_size=BATCH, progress=False)  # warm-up
    [result] = evaluate(model, tokenizer, ["ocnli"], limit=limit, batch_size=BATCH, progress=False)
    return {"load": load, "seconds": result.seconds, "items": result.n, **result.metrics,
            "logprobs": [s["logprobs"] for s in result.samples]}


def bench_lm_eval(workdir: Path, which: str, limit: int) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = HFLM(pretrained=str(workdir / "llama"), dtype=torch.float32, batch_size=BATCH, device="cpu")
    load = time.perf_counter() - start
    tasks = TaskManager(include_path=str(workdir / "tasks"))
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[LMEVAL_TASK], task_manager=tasks, limit=limit, log_samples=True,
                          bootstrap_iters=0)
    seconds = time.perf_counter() - start
    result = out["results"][LMEVAL_TASK]
    samples = sorted(out["samples"][LMEVAL_TASK], key=lambda s: s["doc_id"])
    return {"load": load, "seconds": seconds, "items": len(samples), "acc": result["acc,none"],
            "acc_norm": result["acc_norm,none"],
            "logprobs": [[float(r[0][0]) for r in s["resps"]] for s in samples]}


ENGINES = {"ours": bench_ours, "lm-eval hf": bench_lm_eval}
CASES = [("ours", "float32"), ("lm-eval hf", "float32"), ("ours", "Q4_1 GGUF")]


def run_case(workdir: Path, engine: str, which: str, limit: int, threads: int) -> dict | str:
    cmd = [sys.executable, __file__, "--case", engine, which, "--workdir", str(workdir),
           "--limit", str(limit), "--threads", str(threads)]
    return run_child(cmd, threads, timeout=3600, width=160)


def run_eval_tasks(limit: int = LIMIT, threads: int = 2, log=print) -> str:
    """The markdown section of docs/benchmarks.md."""
    import importlib.util

    with tempfile.TemporaryDirectory(prefix="minicpm-bench-eval-") as tmp:
        workdir = Path(tmp)
        log("eval tasks: preparing weights ...")
        prepare(workdir, limit)
        rows = []
        for engine, which in CASES:
            if engine == "lm-eval hf" and importlib.util.find_spec("lm_eval") is None:
                rows.append((engine, which, "lm-eval is not installed (`make test-peer` installs it)"))
                continue
            log(f"eval tasks: {engine} {which} ...")
            rows.append((engine, which, run_case(workdir, engine, which, limit, threads)))
    return eval_table(rows, limit, threads)


def eval_table(rows: list[tuple[str, str, dict | str]], limit: int, threads: int) -> str:
    peer = next((r for e, _, r in rows if e == "lm-eval hf" and isinstance(r, dict)), None)
    ours_float = next((r for e, w, r in rows if e == "ours" and w == "float32" and isinstance(r, dict)), None)
    lines = [f"## Multiple-choice scoring: OCNLI with SmolLM2-135M-Instruct ({date.today().isoformat()})", "",
             f"Machine: {machine()}; threads: {threads}; batch size {BATCH}. The first {limit} OCNLI dev items "
             "(built-in `ocnli` task: 3 choices, zero-shot), scored by log-likelihood; lm-eval "
             "(lm-evaluation-harness, `hf` backend: transformers) reads the same items, prompt and choices "
             "from a YAML task. Load time excluded.", "",
             "| engine | weights | items/s | seconds | acc | acc_norm | vs lm-eval hf |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for engine, which, r in rows:
        if isinstance(r, str):
            lines.append(f"| {engine} | {which} | {r} | | | | |")
            continue
        rate = r["items"] / r["seconds"]
        ratio = f"{rate / (peer['items'] / peer['seconds']):.2f}x" if peer else "-"
        lines.append(f"| {engine} | {which} | {rate:.2f} | {r['seconds']:.1f} | {r['acc']:.4f} | "
                     f"{r['acc_norm']:.4f} | {ratio} |")
    if peer and ours_float:
        diff = max(abs(a - b) for x, y in zip(peer["logprobs"], ours_float["logprobs"]) for a, b in zip(x, y))
        lines += ["", f"Largest difference of a choice's log-likelihood, ours float32 vs lm-eval hf: {diff:.2e}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=count(1, "--limit"), default=LIMIT)
    parser.add_argument("--threads", type=count(1, "--threads"), default=2)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        engine, which = args.case
        print(json.dumps(measure_here(ENGINES[engine], args.threads, Path(args.workdir), which, args.limit)))
        return 0
    print(run_eval_tasks(args.limit, args.threads, log=lambda m: print(m, file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
