"""`minicpm eval longctx`: sweep context length x needle depth over the prompts of
evaluation/haystacks.py (passkey, number_string, kv_retrieval, niah), score the greedy answers
as InfiniteBench does, and report accuracy per cell, time and peak memory per length, and a
heatmap.

Answers are greedy, from the library's token generator with chunked prefill into the model's KV
cache (`model.kv_cache_dtype`, "int8" halves it), so a prompt up to the model's context needs
one cache and an attention matrix of one chunk by the prompt, not the prompt squared.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.evaluation.haystacks import (
    DEFAULT_DEPTHS,
    MAX_NEW_TOKENS,
    build_prompt,
    check_task,
    check_template,
    is_correct,
    truncate_middle,
)
from minicpm.evaluation.results import format_table

# ---- options ------------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """"1k,2k,4096" -> [1024, 2048, 4096] (k = 1024), sorted, without repeats."""
    out = set()
    for item in text.split(","):
        item = item.strip().lower()
        match = re.fullmatch(r"(\d+)(k?)", item)
        if not match or int(match[1]) == 0:
            raise MiniCPMError(f"bad context length {item!r} in --lengths: use positive integers, "
                               "optionally with k (= 1024), e.g. 1k,2k,4096")
        out.add(int(match[1]) * (1024 if match[2] else 1))
    return sorted(out)


def parse_depths(text: str) -> list[float]:
    out = []
    for item in text.split(","):
        try:
            depth = float(item)
        except ValueError:
            raise MiniCPMError(f"bad needle depth {item.strip()!r} in --depths: use numbers in [0, 1]") from None
        check_depth(depth)
        out.append(depth)
    return sorted(set(out))


def check_depth(depth: float) -> None:
    if not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise MiniCPMError(f"needle depth {depth} is outside [0, 1] (0 = start of the context, 1 = end)")


def default_lengths(context: int) -> list[int]:
    """Powers of two from 1k up to the context (the context itself when it is under 1k)."""
    out, length = [], 1024
    while length <= context:
        out.append(length)
        length *= 2
    return out or [context]


def check_lengths(lengths: Sequence[int], context: int) -> None:
    if not lengths:
        raise MiniCPMError("no context lengths to evaluate")
    for length in lengths:
        if not isinstance(length, int) or length < 1:
            raise MiniCPMError(f"context length {length!r} must be a positive integer")
        if length > context:
            raise MiniCPMError(f"context length {length} exceeds the model's context of {context} tokens "
                               "(max_position_embeddings)")


# ---- results ------------------------------------------------------------------------------------

@dataclass
class SampleRecord:
    length: int
    depth: float
    sample: int
    key: str
    prediction: str
    correct: bool
    seconds: float
    prompt_tokens: int
    needle: str
    question: str
    prompt_sha256: str


@dataclass
class CellResult:
    length: int
    depth: float
    correct: int
    total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


@dataclass
class LengthStats:
    length: int
    prompts: int
    mean_prompt_tokens: float
    seconds: float              # generation (prefill + answer) of all prompts of this length
    seconds_per_prompt: float
    peak_rss_mib: float | None  # VmHWM: the process's peak resident memory so far
    peak_gpu_mib: float | None = None


@dataclass
class LongCtxResult:
    task: str
    template: str
    kv_cache: str
    prefill_chunk: int
    seed: int
    samples: int
    lengths: list[int]
    depths: list[float]
    max_new_tokens: int
    context: int
    cells: list[CellResult] = field(default_factory=list)
    per_length: list[LengthStats] = field(default_factory=list)
    records: list[SampleRecord] = field(default_factory=list)
    prompts_sha256: str = ""    # of every prompt's token ids, in run order: same seed, same hash
    seconds: float = 0.0

    def cell(self, length: int, depth: float) -> CellResult | None:
        return next((c for c in self.cells if c.length == length and c.depth == depth), None)

    def accuracy_grid(self) -> list[list[float]]:
        """[depth][length] accuracy (nan where nothing ran)."""
        return [[c.accuracy if (c := self.cell(n, d)) else math.nan for n in self.lengths] for d in self.depths]

    @property
    def accuracy(self) -> float:
        total = sum(c.total for c in self.cells)
        return sum(c.correct for c in self.cells) / total if total else math.nan

    def table(self) -> str:
        rows = [[f"{d:g}"] + [_percent(a) for a in row] for d, row in zip(self.depths, self.accuracy_grid())]
        by_length = [[c for c in self.cells if c.length == n] for n in self.lengths]
        mean = [_percent(sum(c.correct for c in cs) / t) if (t := sum(c.total for c in cs)) else "-"
                for cs in by_length]
        rows.append(["all"] + mean)
        return format_table(["depth \\ length"] + [length_label(n) for n in self.lengths], rows)

    def timing_table(self) -> str:
        rows = [[length_label(s.length), s.prompts, round(s.mean_prompt_tokens), f"{s.seconds:.1f}",
                 f"{s.seconds_per_prompt:.2f}", _mib(s.peak_rss_mib)]
                + ([_mib(s.peak_gpu_mib)] if s.peak_gpu_mib is not None else []) for s in self.per_length]
        headers = ["length", "prompts", "prompt tokens", "seconds", "s/prompt", "peak RSS MiB"]
        if any(s.peak_gpu_mib is not None for s in self.per_length):
            headers.append("peak GPU MiB")
        return format_table(headers, rows)

    def numbers(self) -> dict[str, Any]:
        """The results as results.json keeps them."""
        return {"accuracy": _json_float(self.accuracy),
                "cells": [{**asdict(c), "accuracy": _json_float(c.accuracy)} for c in self.cells],
                "per_length": [asdict(s) for s in self.per_length]}


def length_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def peak_rss_mib() -> float | None:
    """VmHWM from /proc/self/status: the OS's figure for this process's peak resident memory
    since it started (not the peak of one length alone); None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---- running ------------------------------------------------------------------------------------

def answer_text(model, tokenizer, ids: list[int], max_new_tokens: int, prefill_chunk: int) -> str:
    """The greedy answer of the library's generator, stopping at end-of-sequence / end-of-turn."""
    from minicpm.generation.generate import TokenGenerator
    from minicpm.generation.sampling import SamplingParams
    from minicpm.generation.text import with_chat_stop_ids

    params = with_chat_stop_ids(model, tokenizer, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    gen = TokenGenerator(model, [ids], params, pad_token_id=tokenizer.pad_token_id, prefill_chunk=prefill_chunk)
    tokens = [step[0] for step in gen if step[0] is not None and step[0] not in gen.stop_ids]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run_longctx(model, tokenizer, task: str = "passkey", lengths: Sequence[int] | None = None,
                depths: Sequence[float] | None = None, samples: int = 1, seed: int = 0,
                template: str = "completion", prefill_chunk: int = 512, limit: int | None = None,
                max_new_tokens: int | None = None, progress: bool = True) -> LongCtxResult:
    """Sweep context length x needle depth with `samples` seeded prompts per cell.

    Lengths run shortest first, so each length's peak RSS is the process's peak up to the end
    of that length. `limit` stops after that many prompts (cells not reached stay empty).
    `max_new_tokens` replaces InfiniteBench's answer budget (MAX_NEW_TOKENS).
    """
    import torch
    from tqdm import tqdm

    check_task(task)
    check_template(template)
    context = model.config.max_position_embeddings
    lengths = sorted(set(lengths)) if lengths else default_lengths(context)
    check_lengths(lengths, context)
    depths = list(DEFAULT_DEPTHS) if depths is None else list(depths)
    if not depths:
        raise MiniCPMError("no needle depths to evaluate")
    for depth in depths:
        check_depth(depth)
    depths = sorted({float(d) for d in depths})
    if not isinstance(samples, int) or samples < 1:
        raise MiniCPMError(f"samples per cell must be >= 1, got {samples}")
    if prefill_chunk < 1:
        raise MiniCPMError(f"prefill chunk must be >= 1 token, got {prefill_chunk}")
    if limit is not None and limit < 1:
        raise MiniCPMError(f"limit must be >= 1, got {limit}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise MiniCPMError(f"max new tokens must be >= 1, got {max_new_tokens}")
    max_new = max_new_tokens or MAX_NEW_TOKENS[task]
    result = LongCtxResult(task, template, getattr(model, "kv_cache_dtype", "auto"), prefill_chunk, seed,
                           samples, list(lengths), list(depths), max_new, context)
    total = len(lengths) * len(depths) * samples
    total = min(total, limit) if limit else total
    digest = hashlib.sha256()
    on_gpu = model.device.type == "cuda"
    bar = tqdm(total=total, desc=f"longctx {task}", unit="prompt", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    done = 0
    try:
        for length in lengths:
            if done >= total:
                break
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(model.device)
            records = []
            for depth in depths:
                cell = CellResult(length, depth, 0, 0, 0.0)
                for sample in range(samples):
                    if done >= total:
                        break
                    prompt = build_prompt(tokenizer, task, length, depth, sample, seed, template, max_new)
                    ids = truncate_middle(prompt.ids, context - max_new)
                    digest.update(str(ids).encode())
                    bar.set_postfix(length=length_label(length), depth=f"{depth:g}", tokens=len(ids))
                    t0 = time.perf_counter()
                    prediction = answer_text(model, tokenizer, ids, max_new, prefill_chunk)
                    seconds = time.perf_counter() - t0
                    correct = is_correct(task, prediction, prompt.answer)
                    cell.total += 1
                    cell.correct += correct
                    cell.seconds += seconds
                    records.append(SampleRecord(length, depth, sample, prompt.answer, prediction, correct, seconds,
                                                len(ids), prompt.needle, prompt.question,
                                                hashlib.sha256(prompt.text.encode()).hexdigest()))
                    done += 1
                    bar.update(1)
                if cell.total:
                    result.cells.append(cell)
            if records:
                spent = sum(r.seconds for r in records)
                gpu = torch.cuda.max_memory_allocated(model.device) / 2**20 if on_gpu else None
                result.per_length.append(LengthStats(
                    length, len(records), sum(r.prompt_tokens for r in records) / len(records), spent,
                    spent / len(records), peak_rss_mib(), gpu))
                result.records += records
    finally:
        bar.close()
    result.prompts_sha256 = digest.hexdigest()
    result.seconds = time.perf_counter() - started
    return result


# ---- heatmap ------------------------------------------------------------------------------------

HEATMAP_DPI = 100


def heatmap_figsize(n_lengths: int, n_depths: int) -> tuple[float, float]:
    """Inches (width, height); the PNG is this times HEATMAP_DPI pixels."""
    return 2.6 + 0.9 * n_lengths, 1.6 + 0.45 * n_depths


def plot_heatmap(result: LongCtxResult, path: str | Path, title: str | None = None) -> Path:
    """Accuracy per (depth, length) cell, the value written in each cell; PNG at `path`."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.array(result.accuracy_grid(), dtype=float) * 100
    fig = Figure(figsize=heatmap_figsize(len(result.lengths), len(result.depths)), dpi=HEATMAP_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot or a display
    ax = fig.add_subplot()
    cmap = _accuracy_colours()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(result.lengths)), [length_label(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{100 * d:g}%" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for row, depth_values in enumerate(grid):
        for col, value in enumerate(depth_values):
            label = "-" if math.isnan(value) else f"{value:.0f}"
            ax.text(col, row, label, ha="center", va="center", fontsize=9,
                    color="black" if math.isnan(value) or 25 < value < 85 else "white")
    fig.colorbar(image, ax=ax, label="accuracy %")
    ax.set_title(title or f"{result.task} ({result.samples} per cell)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=HEATMAP_DPI)
    return path


def _accuracy_colours():
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("accuracy", ["#b2182b", "#f4a582", "#f7f7f7", "#92c5de", "#2166ac"])
    return cmap.with_extremes(bad="#dddddd")
