"""Writing output atomically: a file or directory appears under its name only when complete.

Everything minicpm writes (checkpoints, GGUF files, adapters, shards, logs, compiled kernels)
goes through these helpers, so an interrupted run never leaves a half-written file where a
complete one was, and never destroys what was there before.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# mkstemp/mkdtemp create private (0600/0700) temporaries; what we publish gets the permissions an
# ordinary open() would give it. Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` when the block succeeds
    and is removed when it fails. `suffix` ends the temporary name (for writers that read the
    format from the extension, e.g. ".png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to fill; it takes `out_dir`'s place when the
    block succeeds (an existing `out_dir` is kept until then) and is removed when it fails."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, dest: Path) -> None:
    """Move directory `new` to `dest`; an existing `dest` is set aside (not deleted) until the
    new one is in place, so a crash in between leaves one of the two complete."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(directory: Path, name: str) -> None:
    """Delete the temporaries that atomic writes of `directory/name` left behind when their
    process was killed outright; `name` may be a glob pattern ("step-*": every step's)."""
    for stale in directory.glob(f".{name}.*.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
