"""Text corpora as documents: each non-blank line of a plain-text file (surrounding whitespace
dropped), or each record of a JSON Lines file (.jsonl), its text field.

Read by packing (shards.py) and by tokenizer training (tokenizer.py). A bad JSONL record is
yielded as the reason it is bad, with its line number, for the caller to report or skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def documents(path: Path, text_field: str,
              start_line: int = 0) -> Iterator[tuple[int, str | Exception, int]]:
    """(line number of the document, its text or the reason it is bad, bytes read) from line
    `start_line` (0-based) of a file: non-blank lines of plain text, or records of a .jsonl file."""
    jsonl = path.suffix == ".jsonl"
    with path.open("rb") as f:
        for _ in range(start_line):
            f.readline()
        number, size = start_line, 0
        for raw in f:
            number += 1
            size += len(raw)
            line = raw.decode("utf-8", errors="replace")
            if line.strip():
                yield number, _record_text(line, text_field) if jsonl else line.strip(), size
                size = 0
        if size:
            yield number, "", size


def _record_text(line: str, field: str) -> str | Exception:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return ValueError(f"not valid JSON ({exc.msg})")
    if not isinstance(record, dict):
        return ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    text = record.get(field)
    if not isinstance(text, str):
        return ValueError(f"no text field {field!r}" if text is None
                          else f"{field!r} is not a string")
    return text
