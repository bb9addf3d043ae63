"""Pretraining data: text tokenized once into packed, memory-mapped shards.

    minicpm pack corpus/*.txt more.jsonl --tokenizer path/to/model --out data/packed

Documents: each non-blank line of a plain-text file (surrounding whitespace dropped: a WikiText
paragraph or heading, a line of a one-document-per-line corpus), or each record of a JSON Lines
file (.jsonl), its `text_field` (which may hold newlines). Each document becomes [bos if the tokenizer adds one] + tokens + [eos], and
documents follow each other in one stream, cut into shards of `shard_tokens` tokens:

    OUT/shard-00000.bin ...   raw little-endian uint16 (vocabularies up to 65536) or uint32
    OUT/index.json            format, dtype, vocabulary size and fingerprint, bos/eos ids, the
                              shards and their token counts, documents, skipped records, and
                              where packing stands (next file and line, tokens carried over)

Packing is resumable: every finished shard is written under a temporary name and renamed, then
index.json is replaced atomically together with the tokens that spill past the shard (pending.bin).
Running the same command again continues after the last finished shard and ends byte-identical to
an uninterrupted run. Bad JSON Lines records are reported with their line number and skipped
(or stop the run with on_bad="error"), never packed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_file, remove_leftovers, write_text
from minicpm.training.corpus import documents

FORMAT = 1
INDEX = "index.json"
PENDING = "pending.bin"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (every token's text, in id order) and the bos/eos ids."""
    digest = hashlib.sha256()
    for i in range(len(tokenizer)):
        digest.update((tokenizer.id_to_token(i) or "").encode("utf-8", "surrogatepass") + b"\0")
    digest.update(f"{tokenizer.bos_token_id},{tokenizer.eos_token_id}".encode())
    return digest.hexdigest()


def _open_tokenizer(tokenizer):
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from minicpm.training.model_setup import load_tokenizer

    return load_tokenizer(str(tokenizer))


def pack_corpus(files: list[str | Path], tokenizer, out_dir: str | Path, text_field: str = "text",
                shard_tokens: int = 2**26, on_bad: str = "skip", log=print) -> str:
    """Tokenize `files` into shards in `out_dir` (resuming a started run); a one-line summary."""
    if on_bad not in ("skip", "error"):
        raise MiniCPMError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    if shard_tokens < 1:
        raise MiniCPMError(f"shard_tokens must be >= 1, got {shard_tokens}")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise MiniCPMError(f"{path}: no such file")
    tok = _open_tokenizer(tokenizer)
    out = Path(out_dir)
    plan = {"files": [str(p.resolve()) for p in paths], "sizes": [p.stat().st_size for p in paths],
            "text_field": text_field, "shard_tokens": shard_tokens, "fingerprint": tokenizer_fingerprint(tok)}
    index = _start_or_resume(out, plan, tok, log)
    if index["complete"]:
        return f"{out} is already complete: {index['tokens']} tokens in {len(index['shards'])} shards"
    dtype = np.dtype(index["dtype"])
    # token arrays not yet in a shard (lists of Python ints would take ~10x the memory)
    pieces = [np.fromfile(out / PENDING, dtype=dtype)] if (out / PENDING).is_file() else []
    held = sum(p.size for p in pieces)
    bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    bar = _progress(sum(plan["sizes"]), index["bytes_done"])
    for file_index in range(index["file"], len(paths)):
        path = paths[file_index]
        start = index["line"] if file_index == index["file"] else 0
        for line, text, size in documents(path, text_field, start):
            bar.update(size)
            index["bytes_done"] += size
            if isinstance(text, Exception):
                if on_bad == "error":
                    raise MiniCPMError(f"{path}, line {line}: {text}")
                index["skipped"] += 1
                log(f"warning: {path}, line {line}: skipped: {text}")
                continue
            if not text.strip():
                continue
            pieces.append(np.array(bos + tok.encode(text, add_special_tokens=False) + eos, dtype=dtype))
            held += pieces[-1].size
            index["documents"] += 1
            index["file"], index["line"] = file_index, line
            if held >= shard_tokens:
                stream = np.concatenate(pieces)
                while stream.size >= shard_tokens:
                    write_shard(out, index, stream[:shard_tokens], stream[shard_tokens:])
                    stream = stream[shard_tokens:]
                pieces, held = [stream], stream.size
        index["file"], index["line"] = file_index + 1, 0
    if held:
        write_shard(out, index, np.concatenate(pieces), np.zeros(0, dtype=dtype))
    bar.close()
    index["complete"] = True
    _write_index(out, index, np.zeros(0, dtype=dtype))
    if index["tokens"] == 0:
        raise MiniCPMError(f"{', '.join(map(str, paths))}: no text to pack")
    return (f"packed {len(paths)} file(s): {index['documents']} documents, {index['tokens']} tokens in "
            f"{len(index['shards'])} shard(s) -> {out}" + (f" ({index['skipped']} bad records skipped)"
                                                           if index["skipped"] else ""))


def _start_or_resume(out: Path, plan: dict[str, Any], tok, log) -> dict[str, Any]:
    path = out / INDEX
    if path.is_file():
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("plan") != plan:
            raise MiniCPMError(f"{out} holds shards packed from other files, settings or another tokenizer; "
                               "choose another --out")
        if not index["complete"]:
            log(f"resuming: {len(index['shards'])} shard(s) already packed in {out}")
            for name in ("shard-*", PENDING, INDEX):  # what an interrupted run was writing
                remove_leftovers(out, name)
        return index
    if out.exists() and any(out.iterdir()):
        raise MiniCPMError(f"{out} already exists and is not a shard directory")
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "dtype": "<u2" if len(tok) <= 65536 else "<u4", "vocab_size": len(tok),
             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "plan": plan, "shards": [],
             "tokens": 0, "documents": 0, "skipped": 0, "file": 0, "line": 0, "bytes_done": 0,
             "complete": False}
    _write_index(out, index, np.zeros(0, dtype=np.dtype(index["dtype"])))
    return index


def write_shard(out: Path, index: dict[str, Any], tokens: np.ndarray, carry: np.ndarray) -> None:
    """Add one shard of `tokens` to the index; `carry` (the tokens after it) goes to pending."""
    name = shard_name(len(index["shards"]))
    with atomic_file(out / name) as tmp:
        tokens.tofile(tmp)
    index["shards"].append({"file": name, "tokens": int(tokens.size)})
    index["tokens"] += int(tokens.size)
    _write_index(out, index, carry)


def _write_index(out: Path, index: dict[str, Any], carry: np.ndarray) -> None:
    """index.json and pending.bin (the tokens past the last shard), each replaced atomically;
    pending first, so that an index never points past what pending holds."""
    with atomic_file(out / PENDING) as pending:
        carry.tofile(pending)
    write_text(out / INDEX, json.dumps(index, indent=1))


def _progress(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="packing",
                disable=not sys.stderr.isatty())


class PackedTokens:
    """The token stream of a shard directory, read through memory maps."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / INDEX
        if not path.is_file():
            raise MiniCPMError(f"{self.directory} is not a packed shard directory ({INDEX} is missing; "
                               "make one with `minicpm pack`)")
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise MiniCPMError(f"{path}: unknown format {index.get('format')!r}")
        if not index["complete"]:
            raise MiniCPMError(f"{self.directory}: packing did not finish; run the same `minicpm pack` again")
        self.index = index
        self.vocab_size, self.eos_token_id = index["vocab_size"], index["eos_token_id"]
        dtype = np.dtype(index["dtype"])
        self.maps, self.starts = [], []
        start = 0
        for shard in index["shards"]:
            file = self.directory / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise MiniCPMError(f"{file}: missing or truncated (expected {expected} bytes)")
            self.maps.append(np.memmap(file, dtype=dtype, mode="r"))
            self.starts.append(start)
            start += shard["tokens"]
        self.num_tokens = start

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside 0..{self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - self.starts[shard]
            take = min(length - filled, len(self.maps[shard]) - offset)
            out[filled:filled + take] = self.maps[shard][offset:offset + take]
            filled += take
            shard += 1
        return out
