"""Measuring a model: perplexity (evaluation/ppl.py), benchmark tasks scored by
log-likelihood or by generation (evaluation/task_runner.py over the task files of
evaluation/taskfile.py; built-in tasks in evaluation/tasks/), and long-context retrieval
(evaluation/longctx.py). Every run reports through evaluation/results.py: a printed table, a
`results.json`, and per-sample records on request.
"""

from minicpm.evaluation.ppl import PerplexityResult, perplexity
from minicpm.evaluation.task_runner import TaskResult, evaluate
from minicpm.evaluation.taskfile import Task, load_task

__all__ = ["PerplexityResult", "perplexity", "evaluate", "load_task", "Task", "TaskResult"]
