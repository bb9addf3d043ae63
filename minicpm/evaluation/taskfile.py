"""Task files: a small declarative YAML over local JSONL / JSON / CSV data (or the C-Eval, CMMLU
and MMLU CSV layouts as downloaded), read into a `Task` whose items are ready to score.

    name: my_nli                       # default: the file's stem
    data: dev.jsonl                    # relative to the task file; a file or a folder of CSVs
    format: jsonl                      # jsonl | json | csv | ceval | cmmlu | mmlu (default: the suffix)
    filter: "label != '-'"             # optional jinja2 expression: keep items where it is true
    description: ""                    # optional jinja2 text put before everything (few-shot too)
    prompt: "{{premise}}\\nQuestion: {{hypothesis}}\\nAnswer:"   # jinja2, like lm-eval's doc_to_text
    choices: [Yes, Maybe, No]          # a fixed list (entries may be templates) or a field holding a list
    target: label                      # a field or a template: an index, a text among the choices,
    target_map: {entailment: 0, neutral: 1, contradiction: 2}   # ... or a label mapped to an index
    num_fewshot: 0                     # default few-shot count (--num-fewshot overrides)
    fewshot_data: train.jsonl          # optional; default: the task's own items (never the item itself)
    fewshot_match: subject             # optional: shots share this field's value with the item
    fewshot_separator: "\\n\\n"
    target_delimiter: " "              # between a prompt and its answer (lm-eval's default)

A generation task has no `choices`; its `target` is the reference text, plus `metrics`
(exact_match, contains, rouge_l, bleu), `stop` strings, `max_new_tokens`, and `chat: true` to send
the prompt through the model's chat template (few-shot examples become earlier turns; `system`
is an optional system message).

Every mistake is one `MiniCPMError` naming the file, the item and the field.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml

from minicpm.errors import MiniCPMError

BUILTIN = Path(__file__).with_name("tasks")
FORMATS = ("jsonl", "json", "csv", "ceval", "cmmlu", "mmlu")
METRICS = ("exact_match", "contains", "rouge_l", "bleu")
KEYS = {"name", "description", "data", "format", "filter", "prompt", "choices", "target", "target_map",
        "metrics", "stop", "max_new_tokens", "num_fewshot", "fewshot_data", "fewshot_match",
        "fewshot_separator", "target_delimiter", "chat", "system"}

_LETTERS = ["A", "B", "C", "D"]
_EXAM_PROMPT = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n"
# What a `format: ceval|cmmlu|mmlu` task gets unless it says otherwise: lm-eval's prompts for
# these benchmarks (the subject is named as in the file name, underscores as spaces).
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ceval": {"description": "以下是中国关于{{subject}}考试的单项选择题，请选出其中的正确答案。\n\n",
              "prompt": _EXAM_PROMPT + "答案：", "choices": _LETTERS, "target": "answer"},
    "cmmlu": {"description": "以下是关于{{subject}}的单项选择题，请直接给出正确答案的选项。\n\n",
              "prompt": _EXAM_PROMPT + "答案：", "choices": _LETTERS, "target": "answer"},
    "mmlu": {"description": "The following are multiple choice questions (with answers) about {{subject}}.\n\n",
             "prompt": _EXAM_PROMPT + "Answer:", "choices": _LETTERS, "target": "answer"},
}



class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. YAML 1.1 (PyYAML's default) would read a choice list
    [Yes, No] or a label map {yes: 0, no: 1} as booleans."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          autoescape=False)


@dataclass
class Item:
    """One scored question: `prompt` is the rendered prompt alone (no description, no shots)."""

    index: int                      # position among the data's kept items
    doc: dict[str, Any]
    prompt: str
    target: int | str               # the choice's index, or the reference text (generation)
    choices: list[str] | None = None


@dataclass
class Task:
    name: str
    kind: str                       # "multiple_choice" or "generate"
    source: str                     # the task file, or "built-in:<name>"
    data_files: list[Path]
    items: list[Item]
    fewshot_pool: list[Item]
    fewshot_from_items: bool        # the pool is the items themselves (a shot never is its item)
    num_fewshot: int = 0
    fewshot_match: str | None = None
    fewshot_separator: str = "\n\n"
    target_delimiter: str = " "
    description: jinja2.Template | None = None
    metrics: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 128
    chat: bool = False
    system: str | None = None

    def describe(self, item: Item) -> str:
        return self.description.render(item.doc) if self.description is not None else ""

    def answer_text(self, item: Item) -> str:
        return item.choices[item.target] if self.kind == "multiple_choice" else item.target

    def shots(self, item: Item, k: int, rng: random.Random) -> list[Item]:
        """k few-shot examples for `item`, drawn without replacement by `rng` (seeded per run;
        drawn in item order, so a --limit run gets the same shots as a full one)."""
        if k <= 0:
            return []
        pool = self.fewshot_pool
        if self.fewshot_match:
            pool = [s for s in pool if s.doc.get(self.fewshot_match) == item.doc.get(self.fewshot_match)]
        if self.fewshot_from_items:
            pool = [s for s in pool if s.index != item.index]
        if len(pool) < k:
            raise MiniCPMError(f"task {self.name}: {k} few-shot examples asked for item {item.index}, "
                               f"but only {len(pool)} are available")
        return rng.sample(pool, k)

    def context(self, item: Item, shots: list[Item]) -> str:
        """The text a model continues: description, shots with their answers, the prompt."""
        parts = [s.prompt + self.target_delimiter + self.answer_text(s) for s in shots]
        return self.describe(item) + "".join(p + self.fewshot_separator for p in parts) + item.prompt

    def messages(self, item: Item, shots: list[Item]) -> list[dict[str, str]]:
        """The same as chat turns: each shot a user turn and its answer the assistant's."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for shot in shots:
            turns += [{"role": "user", "content": shot.prompt},
                      {"role": "assistant", "content": self.answer_text(shot)}]
        turns.append({"role": "user", "content": item.prompt})
        first_user = 1 if self.system else 0
        turns[first_user] = {**turns[first_user], "content": self.describe(item) + turns[first_user]["content"]}
        return turns


# --- reading the task file --------------------------------------------------------------------------
def resolve_task_path(path_or_name: str | Path) -> Path:
    """A built-in task's name (`ocnli`), or a path to a task file."""
    text = str(path_or_name)
    builtin = BUILTIN / f"{text}.yaml"
    if "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml")) and builtin.is_file():
        return builtin
    path = Path(text).expanduser()
    if not path.is_file():
        names = ", ".join(builtin_task_names())
        raise MiniCPMError(f"task {text!r}: no such task file and no built-in task of that name "
                           f"(built in: {names})")
    return path


def builtin_task_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def load_task(path_or_name: str | Path) -> Task:
    """Read a task file (or a built-in task by name) and its data into a `Task`."""
    path = resolve_task_path(path_or_name)
    spec = _read_yaml(path)
    where = f"task file {path}"
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise MiniCPMError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    name = str(spec.get("name") or path.stem)
    data = _required(spec, "data", where)
    data_path = _relative(path, data)
    fmt = spec.get("format") or _format_of(data_path, where)
    if fmt not in FORMATS:
        raise MiniCPMError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    spec = {**FORMAT_DEFAULTS.get(fmt, {}), **spec}
    kind = "multiple_choice" if spec.get("choices") is not None else "generate"
    builder = _ItemBuilder(name, spec, kind, where)
    files, docs = read_data(data_path, fmt)
    items = builder.build(docs, files)
    if not items:
        raise MiniCPMError(f"task {name}: no items in {data_path}" + (" after the filter" if spec.get("filter") else ""))
    fewshot_from_items = spec.get("fewshot_data") is None
    if fewshot_from_items:
        pool = items
    else:
        shot_path = _relative(path, spec["fewshot_data"])
        shot_files, shot_docs = read_data(shot_path, fmt)
        pool = builder.build(shot_docs, shot_files)
    source = f"built-in:{name}" if path.parent == BUILTIN else str(path)
    metrics = _metrics(spec, kind, where)
    return Task(
        name=name, kind=kind, source=source, data_files=files, items=items, fewshot_pool=pool,
        fewshot_from_items=fewshot_from_items,
        num_fewshot=_int(spec, "num_fewshot", 0, where, minimum=0),
        fewshot_match=spec.get("fewshot_match"),
        fewshot_separator=str(spec.get("fewshot_separator", "\n\n")),
        target_delimiter=str(spec.get("target_delimiter", " ")),
        description=_compile(spec["description"], f"{where}: description") if spec.get("description") else None,
        metrics=metrics, stop=_strings(spec.get("stop", []), "stop", where),
        max_new_tokens=_int(spec, "max_new_tokens", 128, where, minimum=1),
        chat=bool(spec.get("chat", False)), system=spec.get("system"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise MiniCPMError(f"task file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise MiniCPMError(f"task file {path}: not UTF-8 text") from None
    if not isinstance(spec, dict):
        raise MiniCPMError(f"task file {path}: expected a mapping of keys (name, data, prompt, ...), "
                           f"got {type(spec).__name__}")
    return spec


def _required(spec: dict, key: str, where: str) -> Any:
    if spec.get(key) in (None, ""):
        raise MiniCPMError(f"{where}: the key {key!r} is required")
    return spec[key]


def _relative(task_path: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else task_path.parent / path


def _format_of(path: Path, where: str) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "json", "csv"):
        return suffix
    raise MiniCPMError(f"{where}: say the data's `format` ({', '.join(FORMATS)}); "
                       f"it cannot be told from {path.name!r}")


def _int(spec: dict, key: str, default: int, where: str, minimum: int) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MiniCPMError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _strings(value: Any, key: str, where: str) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MiniCPMError(f"{where}: {key} must be a string or a list of strings, got {value!r}")
    return value


def _metrics(spec: dict, kind: str, where: str) -> list[str]:
    if kind == "multiple_choice":
        if spec.get("metrics") not in (None, ["acc", "acc_norm"]):
            raise MiniCPMError(f"{where}: a multiple-choice task reports acc and acc_norm; "
                               f"`metrics` is for generation tasks")
        return ["acc", "acc_norm"]
    metrics = _strings(spec.get("metrics", ["exact_match"]), "metrics", where)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise MiniCPMError(f"{where}: unknown metric(s) {', '.join(bad) or '(none given)'}; "
                           f"known: {', '.join(METRICS)}")
    return metrics


def _compile(source: Any, what: str) -> jinja2.Template:
    if not isinstance(source, str):
        raise MiniCPMError(f"{what}: expected a template string, got {source!r}")
    try:
        template = _ENV.from_string(source)
        template.fields = jinja2.meta.find_undeclared_variables(_ENV.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise MiniCPMError(f"{what}: bad template ({e.message}, line {e.lineno})") from None
    return template


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


# --- building items -----------------------------------------------------------------------------------
class _ItemBuilder:
    """Renders prompt, choices and target of each record, naming the item and field of any fault."""

    def __init__(self, name: str, spec: dict, kind: str, where: str):
        self.name, self.kind, self.where = name, kind, where
        self.prompt = _compile(_required(spec, "prompt", where), f"{where}: prompt")
        target = _required(spec, "target", where)
        self.target = _compile(target, f"{where}: target") if _is_template(target) else str(target)
        self.target_map = spec.get("target_map")
        if self.target_map is not None and not isinstance(self.target_map, dict):
            raise MiniCPMError(f"{where}: target_map must map labels to choice indices, got {self.target_map!r}")
        self.filter = None
        if spec.get("filter"):
            try:
                self.filter = _ENV.compile_expression(str(spec["filter"]), undefined_to_none=False)
            except jinja2.TemplateSyntaxError as e:
                raise MiniCPMError(f"{where}: bad filter expression ({e.message})") from None
        choices = spec.get("choices")
        if isinstance(choices, list):
            if len(choices) < 2:
                raise MiniCPMError(f"{where}: choices needs at least two entries, got {choices!r}")
            self.choices = [_compile(str(c), f"{where}: choices") for c in choices]
        elif choices is None or isinstance(choices, str):
            self.choices = choices  # None (generation) or the field holding each item's list
        else:
            raise MiniCPMError(f"{where}: choices must be a list or the name of a field, got {choices!r}")

    def build(self, docs: list[tuple[str, dict]], files: list[Path]) -> list[Item]:
        items = []
        for origin, doc in docs:
            if self.filter is not None and not self._keep(origin, doc):
                continue
            prompt = self._render(self.prompt, doc, origin, "prompt")
            choices = self._choices(doc, origin) if self.kind == "multiple_choice" else None
            target = self._target(doc, origin, choices)
            items.append(Item(index=len(items), doc=doc, prompt=prompt, target=target, choices=choices))
        return items

    def _keep(self, origin: str, doc: dict) -> bool:
        try:
            return bool(self.filter(**doc))
        except jinja2.UndefinedError as e:
            raise MiniCPMError(f"task {self.name}: {origin}: the filter names an absent field ({e.message})") from None

    def _render(self, template: jinja2.Template, doc: dict, origin: str, what: str) -> str:
        absent = sorted(f for f in template.fields if f not in doc)
        if absent:
            raise MiniCPMError(f"task {self.name}: {origin}: the {what} names field {absent[0]!r}, which "
                               f"this item does not have (its fields: {', '.join(map(str, doc))})")
        try:
            return template.render(doc)
        except jinja2.UndefinedError as e:
            raise MiniCPMError(f"task {self.name}: {origin}: the {what} reads something absent ({e.message})") from None
        except Exception as e:  # an error raised inside the template's own expressions
            raise MiniCPMError(f"task {self.name}: {origin}: the {what} failed to render ({e})") from None

    def _field(self, doc: dict, key: str, origin: str, what: str) -> Any:
        if key not in doc:
            raise MiniCPMError(f"task {self.name}: {origin}: the {what} names field {key!r}, which this "
                               f"item does not have (its fields: {', '.join(map(str, doc))})")
        return doc[key]

    def _choices(self, doc: dict, origin: str) -> list[str]:
        if isinstance(self.choices, str):
            value = self._field(doc, self.choices, origin, "choices")
            if not isinstance(value, list) or len(value) < 2:
                raise MiniCPMError(f"task {self.name}: {origin}: field {self.choices!r} should hold a list "
                                   f"of at least two choices, got {value!r}")
            return [str(v) for v in value]
        return [self._render(c, doc, origin, "choices") for c in self.choices]

    def _target(self, doc: dict, origin: str, choices: list[str] | None) -> int | str:
        if isinstance(self.target, str):
            value = self._field(doc, self.target, origin, "target")
        else:
            value = self._render(self.target, doc, origin, "target")
        if choices is None:
            if not isinstance(value, (str, int, float)) or str(value).strip() == "":
                raise MiniCPMError(f"task {self.name}: {origin}: the target should be a non-empty text, got {value!r}")
            return str(value)
        return self._choice_index(value, choices, origin)

    def _choice_index(self, value: Any, choices: list[str], origin: str) -> int:
        if self.target_map is not None:
            if value not in self.target_map:
                raise MiniCPMError(f"task {self.name}: {origin}: target {value!r} is not in target_map "
                                   f"({', '.join(map(repr, self.target_map))}); a `filter` can drop such items")
            value = self.target_map[value]
        if isinstance(value, str) and value in choices:
            return choices.index(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
            return value
        raise MiniCPMError(f"task {self.name}: {origin}: bad target {value!r}: neither an index below "
                           f"{len(choices)} nor one of the choices {choices}")


# --- reading the data -----------------------------------------------------------------------------------
def read_data(path: Path, fmt: str) -> tuple[list[Path], list[tuple[str, dict]]]:
    """The files read and their records, each with where it came from ("file.jsonl line 3")."""
    if not path.exists():
        raise MiniCPMError(f"data {path}: no such file or folder")
    if path.is_dir():
        if fmt not in ("csv", "ceval", "cmmlu", "mmlu"):
            raise MiniCPMError(f"data {path}: a folder is read as CSV files (format csv, ceval, cmmlu or "
                               f"mmlu), not as {fmt}")
        files = sorted(path.rglob("*.csv"))
        if not files:
            raise MiniCPMError(f"data {path}: the folder holds no .csv files")
    else:
        files = [path]
    reader = READERS[fmt]
    records = [record for f in files for record in reader(f)]
    return files, records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MiniCPMError(f"data {path}: not UTF-8 text") from None


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MiniCPMError(f"data {path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise MiniCPMError(f"data {path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((f"{path.name} line {number}", record))
    return records


def read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise MiniCPMError(f"data {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MiniCPMError(f"data {path}: expected a JSON list of objects")
    return [(f"{path.name} item {i}", r) for i, r in enumerate(records)]


def _csv_rows(path: Path) -> list[list[str]]:
    try:
        return [row for row in csv.reader(_read_text(path).splitlines()) if row]
    except csv.Error as e:
        raise MiniCPMError(f"data {path}: not valid CSV ({e})") from None


def read_csv(path: Path) -> list[tuple[str, dict]]:
    rows = _csv_rows(path)
    if not rows:
        return []
    header = rows[0]
    out = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise MiniCPMError(f"data {path} row {number}: {len(row)} columns, the header has {len(header)}")
        out.append((f"{path.name} row {number}", dict(zip(header, row))))
    return out


def _subject(path: Path, suffixes: tuple[str, ...]) -> str:
    stem = path.stem
    for suffix in suffixes:
        stem = stem.removesuffix(suffix)
    return stem.replace("_", " ")


def _exam_item(path: Path, number: int, cells: list[str], subject: str) -> tuple[str, dict]:
    """One question of the exam layouts as {question, A, B, C, D, answer, subject}."""
    question, a, b, c, d, answer = (cell.strip() if i == 5 else cell for i, cell in enumerate(cells[:6]))
    return (f"{path.name} row {number}",
            {"question": question, "A": a, "B": b, "C": c, "D": d, "answer": answer, "subject": subject})


def _read_exam(path: Path, header: list[str] | None, columns: slice, suffixes: tuple[str, ...]):
    """C-Eval (id,question,A,B,C,D,answer[,explanation]), CMMLU (,Question,A,B,C,D,Answer) and
    MMLU (no header: question,A,B,C,D,answer): the same six cells at different places."""
    rows = _csv_rows(path)
    first = 1 if header is not None else 0
    if header is not None and rows:
        got = [h.strip().lower() for h in rows[0][:len(header)]]
        if got != header:
            raise MiniCPMError(f"data {path}: expected the header {','.join(header)}..., got {','.join(rows[0])}")
    subject = _subject(path, suffixes)
    items = []
    for number, row in enumerate(rows[first:], first + 1):
        cells = row[columns]
        if len(cells) < 6:
            raise MiniCPMError(f"data {path} row {number}: expected question, A, B, C, D and the answer, "
                               f"got {len(cells)} cells")
        items.append(_exam_item(path, number, cells, subject))
    return items


def read_ceval(path: Path) -> list[tuple[str, dict]]:
    return _read_exam(path, ["id", "question", "a", "b", "c", "d", "answer"], slice(1, 7),
                      ("_val", "_dev", "_test"))


def read_cmmlu(path: Path) -> list[tuple[str, dict]]:
    return _read_exam(path, ["", "question", "a", "b", "c", "d", "answer"], slice(1, 7), ())


def read_mmlu(path: Path) -> list[tuple[str, dict]]:
    return _read_exam(path, None, slice(0, 6), ("_val", "_dev", "_test"))


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "ceval": read_ceval,
           "cmmlu": read_cmmlu, "mmlu": read_mmlu}
