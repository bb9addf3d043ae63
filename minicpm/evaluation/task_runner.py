"""Benchmark tasks: multiple choice scored by log-likelihood, and generation scored by text
metrics, over task files (`minicpm.evaluation.taskfile`).

    from minicpm.evaluation import evaluate
    results = evaluate(model, tokenizer, tasks=["ocnli", "my_task.yaml"], limit=200)
    results[0].metrics["acc"], results[0].stderr["acc"]

Multiple choice, as lm-eval defines it (lm_eval/api/task.py, `process_results`): each choice is
the continuation `target_delimiter + choice` of the context; `acc` is 1 when the choice with the
highest summed log-probability is the target, `acc_norm` the same with each log-probability divided
by the choice's length in characters (the choice text, without the delimiter); ties go to the first
choice. stderr is the sample standard deviation over sqrt(n), lm-eval's `mean_stderr`.

Generation: greedy, up to `max_new_tokens`, cut at the first stop string (and at the model's end
of sequence); exact_match / contains / rouge_l are per-sample means, bleu a corpus score
(`minicpm.evaluation.textmetrics`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minicpm.errors import MiniCPMError
from minicpm.evaluation.loglikelihood import encode, encode_question, score_questions
from minicpm.evaluation.taskfile import Item, Task, load_task
from minicpm.evaluation.textmetrics import SAMPLE_METRICS, corpus_bleu


@dataclass
class TaskResult:
    """One task's numbers, and what produced them."""

    task: str
    kind: str                                   # "multiple_choice" or "generate"
    n: int                                      # items scored
    num_fewshot: int
    metrics: dict[str, float]
    stderr: dict[str, float | None]             # None where there is no per-sample mean (bleu)
    seconds: float
    source: str                                 # the task file, or built-in:<name>
    data_files: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def items_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0


def evaluate(model, tokenizer, tasks: Sequence[str | Path | Task], num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 8, seed: int = 1234,
             progress: bool = True) -> list[TaskResult]:
    """Run each task (a built-in name, a task file, or a loaded `Task`) on the model."""
    if tokenizer is None:
        raise MiniCPMError("evaluating tasks needs the model's tokenizer")
    if limit is not None and limit < 1:
        raise MiniCPMError(f"limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise MiniCPMError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise MiniCPMError(f"batch size must be >= 1, got {batch_size}")
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if not loaded:
        raise MiniCPMError("no tasks given")
    return [run_task(model, tokenizer, task, num_fewshot, limit, batch_size, seed, progress) for task in loaded]


def run_task(model, tokenizer, task: Task, num_fewshot: int | None = None, limit: int | None = None,
             batch_size: int = 8, seed: int = 1234, progress: bool = True) -> TaskResult:
    shots_k = task.num_fewshot if num_fewshot is None else num_fewshot
    items = task.items[:limit] if limit is not None else task.items
    rng = random.Random(seed)
    shots = [task.shots(item, shots_k, rng) for item in items]
    bar = tqdm(total=len(items), desc=task.name, unit="item", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        if task.kind == "multiple_choice":
            metrics, samples = _multiple_choice(model, tokenizer, task, items, shots, batch_size, bar.update)
        else:
            metrics, samples = _generation(model, tokenizer, task, items, shots, batch_size, bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    values = {name: value for name, (value, _) in metrics.items()}
    errors = {name: err for name, (_, err) in metrics.items()}
    return TaskResult(task=task.name, kind=task.kind, n=len(items), num_fewshot=shots_k, metrics=values,
                      stderr=errors, seconds=seconds, source=task.source,
                      data_files=[str(p) for p in task.data_files], samples=samples)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean, and lm-eval's stderr of it: sample standard deviation / sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax tie rule, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc's prediction, acc_norm's prediction): argmax of logprob and of logprob / characters."""
    return argmax(logprobs), argmax([lp / len(c) for lp, c in zip(logprobs, choices)])


# --- multiple choice ----------------------------------------------------------------------------------
def _multiple_choice(model, tokenizer, task: Task, items: list[Item], shots: list[list[Item]],
                     batch_size: int, advance) -> tuple[dict, list[dict]]:
    contexts = [task.context(item, s) for item, s in zip(items, shots)]
    max_len = model.config.max_position_embeddings
    questions = [encode_question(tokenizer, ctx, [task.target_delimiter + c for c in item.choices], max_len)
                 for ctx, item in zip(contexts, items)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_questions(model, questions, batch_size, pad_id=pad, progress=advance)
    acc, acc_norm, samples = [], [], []
    for item, ctx, item_scores in zip(items, contexts, scores):
        logprobs = [s.logprob for s in item_scores]
        pred, pred_norm = choice_predictions(logprobs, item.choices)
        acc.append(float(pred == item.target))
        acc_norm.append(float(pred_norm == item.target))
        samples.append({"index": item.index, "prompt": ctx, "choices": item.choices,
                        "logprobs": logprobs, "greedy": [s.greedy for s in item_scores],
                        "prediction": pred, "prediction_norm": pred_norm, "target": item.target,
                        "acc": acc[-1], "acc_norm": acc_norm[-1]})
    return {"acc": mean_and_stderr(acc), "acc_norm": mean_and_stderr(acc_norm)}, samples


# --- generation -------------------------------------------------------------------------------------------
def _generation(model, tokenizer, task: Task, items: list[Item], shots: list[list[Item]],
                batch_size: int, advance) -> tuple[dict, list[dict]]:
    from minicpm.generation.sampling import SamplingParams
    from minicpm.generation.text import generate_texts

    prompts, shown = [], []
    for item, s in zip(items, shots):
        if task.chat:
            messages = task.messages(item, s)
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            shown.append(messages)
        else:
            text = task.context(item, s)
            prompts.append(encode(tokenizer, text))
            shown.append(text)
    params = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=task.max_new_tokens, stop=task.stop)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        outputs += generate_texts(model, tokenizer, chunk, params)
        advance(len(chunk))
    references = [item.target for item in items]
    per_sample = {m: [SAMPLE_METRICS[m](o, r) for o, r in zip(outputs, references)]
                  for m in task.metrics if m in SAMPLE_METRICS}
    metrics = {m: mean_and_stderr(v) for m, v in per_sample.items()}
    if "bleu" in task.metrics:
        metrics["bleu"] = (corpus_bleu(outputs, references), None)
    metrics = {m: metrics[m] for m in task.metrics}  # the task file's order
    samples = [{"index": item.index, "prompt": p, "generation": o, "target": item.target,
                **{m: v[i] for m, v in per_sample.items()}}
               for i, (item, p, o) in enumerate(zip(items, shown, outputs))]
    return metrics, samples
