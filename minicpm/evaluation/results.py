"""What an evaluation run leaves behind: a table on the terminal, `results.json` (model, data
hash, protocol, settings, numbers, timings, version) and, with `--output DIR`, one JSONL record
per sample for inspection. Shared by every `minicpm eval` command."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class RunReport:
    """One evaluation run, as written to results.json."""

    command: str                      # "ppl", "tasks" or "longctx"
    model: dict[str, Any]             # from describe_model()
    data: dict[str, Any]              # what was read: names, paths, sha256, sizes
    settings: dict[str, Any]          # protocol, seqlen, few-shot, limits, ...
    numbers: dict[str, Any]           # the results
    timings: dict[str, float] = field(default_factory=dict)  # seconds, tokens/s, items/s
    version: str = ""
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        out = asdict(self)
        try:
            installed = version("minicpm")
        except PackageNotFoundError:
            installed = "unknown"
        out["version"] = self.version or installed
        out["created"] = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count()}
        return out


def describe_model(model, source: str | None) -> dict[str, Any]:
    """The facts about a loaded model that make a number reproducible."""
    config = model.config
    weights = next(model.parameters(), None)
    quant = getattr(config, "quantization", None) or getattr(model, "quantization", None)
    return {"source": source or "default", "architecture": type(model).__name__,
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "context": config.max_position_embeddings,
            "dtype": str(weights.dtype).removeprefix("torch.") if weights is not None else None,
            "quantization": quant if isinstance(quant, (str, dict, type(None))) else str(quant)}


@contextmanager
def atomic_text_file(path: Path):
    """A text file written through a temporary file in the same folder and renamed into place,
    so an interrupted run never leaves a half-written file over a previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: RunReport, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "results.json"
    with atomic_text_file(path) as f:
        json.dump(report.to_json(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def write_records(records: Iterable[dict[str, Any]], out_dir: str | Path, name: str) -> Path:
    """Per-sample records as JSONL (`samples_<name>.jsonl`)."""
    path = Path(out_dir) / f"samples_{name}.jsonl"
    with atomic_text_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned), as printed by every eval command."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.lstrip("±"))
        return True
    except ValueError:
        return False
