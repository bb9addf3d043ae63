"""Long-context retrieval: InfiniteBench's synthetic tasks (passkey, number_string, kv_retrieval)
and a needle-in-a-haystack sweep, generated from a seed and sized in the model's own tokens.

Every prompt is a haystack of whole filler units with one needle in it:

- passkey / number_string: InfiniteBench's noise line ("The grass is green. ...") repeated, the
  needle line ("The pass key is 12345. Remember it. 12345 is the pass key.") after the first
  round(depth * units) lines; keys drawn as InfiniteBench draws them (5 random digits; for
  number_string 5 digits, then 5 times a copy of a random digit inserted next to it).
- kv_retrieval: a JSON object of random UUID keys and values (`JSON data:\\n{"k": "v", ...}`),
  the asked-for pair at index round(depth * (pairs - 1)).
- niah: sentences of WikiText-2 (data/niah_haystack.txt, CC BY-SA) from a seeded start, the
  San Francisco needle sentence after the first round(depth * units) sentences.

Sizing: a cell of length L holds the prompt and the answer, so the prompt (template and special
tokens included) gets the most filler units whose token count stays within L - max_new_tokens,
counted with the model's tokenizer. Lengths above the model's context are refused; a prompt that
still does not fit the context is cut in the middle, as InfiniteBench cuts its 128k inputs.

Templates: "completion" (the default) is InfiniteBench's completion style: the prompt ends "The
pass key is", so base and chat models alike answer with the key first. "chat" is InfiniteBench's
chat-model text wrapped in the tokenizer's chat template; a chat model that restates the
question ("The pass key is 5...") then runs out of InfiniteBench's 6-token budget before the
key is complete (SmolLM2 spells numbers one digit per token), so raise `max_new_tokens` with it.

Scoring is InfiniteBench's: passkey and number_string are right when the first run of digits
in the answer equals the key; kv_retrieval when the value is one of the answer's words after
\\n : " ' . , ? ! { } become spaces. niah is right when the answer holds all of the words
"sandwich", "Dolores" and "Park" (case-insensitive, whole words).

Answers are greedy, from the library's token generator with chunked prefill into the model's KV
cache (`model.kv_cache_dtype`, "int8" halves it), so a prompt up to the model's context needs
one cache and an attention matrix of one chunk by the prompt, not the prompt squared.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.evaluation.results import format_table

TASKS = ("passkey", "number_string", "kv_retrieval", "niah")
TEMPLATES = ("completion", "chat")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# InfiniteBench's answer budgets (src/eval_utils.py); niah's holds a one-sentence answer
MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "niah": 48}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLES = {"passkey": "The pass key is {key}. Remember it. {key} is the pass key.\n",
           "number_string": "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"}
QUESTIONS = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?",
             "kv_retrieval": '\nKey: "{key}"\nThe value associated with the specified key is: ',
             "niah": "What is the best thing to do in San Francisco?"}
NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_KEY_WORDS = ("sandwich", "dolores", "park")
NIAH_HAYSTACK = Path(__file__).with_name("data") / "niah_haystack.txt"

_FIND = "There is an important info hidden inside a lot of irrelevant text. "
_KV = "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}"
# InfiniteBench src/prompt.py: yarn_mistral_templates (completion) and gpt4_templates (chat)
PROMPTS = {
    ("passkey", "completion"): _FIND + "Find it and memorize it. I will quiz you about the important "
                                       "information.\n\n{context}\n\n{input}\n\nThe pass key is",
    ("passkey", "chat"): _FIND + "Find it and memorize them. I will quiz you about the important "
                                 "information there.\n\n{context}\n\n{input}",
    ("number_string", "completion"): _FIND + "Find it. I will quiz you about the important information "
                                             "there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",
    ("number_string", "chat"): _FIND + "Find it. I will quiz you about the important information "
                                       "there.\n\n{context}\n\n{input}",
    ("kv_retrieval", "completion"): _KV,
    ("kv_retrieval", "chat"): _KV,
    # gkamradt's needle-in-a-haystack question; completion style primes the answer like passkey's
    ("niah", "completion"): "{context}\n\nQuestion: {input}\nAnswer: The best thing to do in San Francisco is",
    ("niah", "chat"): "{context}\n\n{input} Don't give information outside the document or repeat your findings.",
}


# ---- scoring ------------------------------------------------------------------------------------

def first_int(prediction: str) -> str:
    """The first run of digits in the text ("" if none), InfiniteBench's first_int_match."""
    return next((piece for piece in re.split("[^0-9]", prediction) if piece), "")


def kv_words(prediction: str) -> list[str]:
    for c in ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"):
        prediction = prediction.replace(c, " ")
    return prediction.split()


def is_correct(task: str, prediction: str, answer: str) -> bool:
    if task in ("passkey", "number_string"):
        return first_int(prediction) == answer
    if task == "kv_retrieval":
        return answer in kv_words(prediction)
    words = set(re.findall(r"[a-z]+", prediction.lower()))
    return all(word in words for word in NIAH_KEY_WORDS)


# ---- haystacks ----------------------------------------------------------------------------------

@dataclass
class Filled:
    """A haystack rendered with `units` filler units around its needle."""

    context: str
    question: str
    answer: str
    needle: str


def needle_index(units: int, depth: float) -> int:
    """How many filler units come before the needle."""
    return round(depth * units)


class NoiseHaystack:
    """passkey / number_string: noise lines with the key's needle line among them."""

    def __init__(self, task: str, key: str):
        self.key, self.needle = key, NEEDLES[task].format(key=key)
        self.question = QUESTIONS[task]

    def render(self, units: int, depth: float) -> Filled:
        j = needle_index(units, depth)
        return Filled(NOISE * j + self.needle + NOISE * (units - j), self.question, self.key, self.needle)


class KVHaystack:
    """kv_retrieval: `units + 1` random UUID pairs; the asked-for one sits at the depth."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pairs: list[tuple[str, str]] = []

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def render(self, units: int, depth: float) -> Filled:
        while len(self.pairs) < units + 1:  # the same seed always gives the same pair sequence
            self.pairs.append((self._uuid(), self._uuid()))
        pairs = self.pairs[:units + 1]
        key, value = pairs[needle_index(units, depth)]
        body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
        return Filled("JSON data:\n{" + body + "}", QUESTIONS["kv_retrieval"].format(key=key), value,
                      f'"{key}": "{value}"')


class SentenceHaystack:
    """niah: consecutive sentences of the shipped WikiText slice (wrapping around at its end)."""

    def __init__(self, sentences: Sequence[str], start: int):
        self.sentences, self.start = sentences, start

    def render(self, units: int, depth: float) -> Filled:
        n = len(self.sentences)
        chosen = [self.sentences[(self.start + i) % n] for i in range(units)]
        j = needle_index(units, depth)
        needle = NIAH_NEEDLE + " "
        return Filled("".join(chosen[:j]) + needle + "".join(chosen[j:]), QUESTIONS["niah"],
                      " ".join(NIAH_KEY_WORDS), needle)


_SENTENCES: list[str] | None = None


def niah_sentences() -> list[str]:
    """The haystack's sentences, each with its trailing space (newline at a paragraph's end);
    headings and blank lines are left out."""
    global _SENTENCES
    if _SENTENCES is None:
        out = []
        for line in NIAH_HAYSTACK.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("="):
                continue
            parts = re.split(r"(?<= \.) ", line)
            out += [p + " " for p in parts[:-1]] + [parts[-1] + "\n"]
        _SENTENCES = out
    return _SENTENCES


def make_haystack(task: str, rng: random.Random):
    if task == "passkey":
        return NoiseHaystack(task, "".join(str(rng.randint(0, 9)) for _ in range(5)))
    if task == "number_string":
        digits = [str(rng.randint(0, 9)) for _ in range(5)]
        for k in range(5):  # InfiniteBench: a copy of a random digit goes in next to it
            pos = rng.randint(0, 5 + k - 1)
            digits.insert(pos, digits[pos])
        return NoiseHaystack(task, "".join(digits))
    if task == "kv_retrieval":
        return KVHaystack(rng)
    sentences = niah_sentences()
    return SentenceHaystack(sentences, rng.randrange(len(sentences)))


# ---- prompts ------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One generated prompt, ready to run."""

    task: str
    length: int
    depth: float
    sample: int
    units: int          # filler units (noise lines, extra JSON pairs, sentences)
    answer: str
    question: str
    needle: str
    context: str
    text: str           # the prompt before the chat template (if any)
    ids: list[int]


def encode_prompt(tokenizer, text: str, template: str) -> list[int]:
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return [bos] + ids if getattr(tokenizer, "add_bos_token", False) and bos is not None else ids


def sample_rng(seed: int, task: str, length: int, depth: float, sample: int) -> random.Random:
    # a string seed is hashed with SHA-512: the same on every run and machine
    return random.Random(f"{seed}/{task}/{length}/{depth!r}/{sample}")


def fit_units(count: Callable[[int], int], budget: int) -> int:
    """The most filler units whose prompt has at most `budget` tokens (`count(units)` grows
    with units). Estimates from a few units, then brackets and bisects."""
    base = count(0)
    if base > budget:
        raise MiniCPMError(f"the prompt needs {base} tokens even without filler; "
                           f"a length of at least {base} plus the answer is needed")
    per_unit = max(1.0, (count(8) - base) / 8)
    guess = int((budget - base) / per_unit)
    lo, hi = max(0, int(guess * 0.95) - 1), guess + int(guess * 0.05) + 2
    if count(lo) > budget:
        lo = 0
    while count(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # count(lo) fits, count(hi) does not
        mid = (lo + hi) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def build_prompt(tokenizer, task: str, length: int, depth: float, sample: int = 0, seed: int = 0,
                 template: str = "completion", max_new_tokens: int | None = None) -> Prompt:
    """The prompt of one cell sample: its filler sized so the prompt has at most
    length - max_new_tokens tokens (default MAX_NEW_TOKENS[task]) and one more unit would not fit."""
    check_task(task)
    check_template(template)
    haystack = make_haystack(task, sample_rng(seed, task, length, depth, sample))
    pattern = PROMPTS[task, template]

    def text_of(units: int) -> tuple[Filled, str]:
        filled = haystack.render(units, depth)
        return filled, pattern.format(context=filled.context, input=filled.question)

    def count(units: int) -> int:
        return len(encode_prompt(tokenizer, text_of(units)[1], template))

    try:
        units = fit_units(count, length - (max_new_tokens or MAX_NEW_TOKENS[task]))
    except MiniCPMError as e:
        raise MiniCPMError(f"length {length} is too short for {task}: {e}") from None
    filled, text = text_of(units)
    return Prompt(task, length, depth, sample, units, filled.answer, filled.question, filled.needle,
                  filled.context, text, encode_prompt(tokenizer, text, template))


def truncate_middle(ids: list[int], limit: int) -> list[int]:
    """InfiniteBench's cut for inputs over the window: keep the first and last limit/2 tokens."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


# ---- options ------------------------------------------------------------------------------------

def check_task(task: str) -> None:
    if task not in TASKS:
        raise MiniCPMError(f"unknown long-context task {task!r}; choose one of {', '.join(TASKS)}")


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise MiniCPMError(f"unknown prompt template {template!r}; choose completion or chat")


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
    depths = list(DEFAULT_DEPTHS) if depths is None else sorted(set(depths))
    if not depths:
        raise MiniCPMError("no needle depths to evaluate")
    for depth in depths:
        check_depth(depth)
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
