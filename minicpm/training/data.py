"""Chat data for fine-tuning: records -> token ids with labels only on what the assistant says.

Accepted records (one JSON list file, or JSON Lines):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (ChatML style)
  {"instruction": "...", "input": "...", "output": "...", "system"?: "..."}       (alpaca style)

A conversation is rendered with the model's own chat template. The tokens of each assistant
turn are found by rendering the conversation up to that turn twice, with and without the turn,
and taking the difference, so any template works; labels are -100 everywhere else (system and
user text, role markers). As the official MiniCPM fine-tuning does, the end-of-sequence token
closes the conversation and is trained, unless the template already ends the assistant's turn
with a stop token (ChatML's <|im_end|>).

Bad records are never trained on silently: each is reported with its line number (JSON Lines)
or index (a JSON list) and the reason, then skipped, or the whole load fails (`on_bad="error"`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError

IGNORE_INDEX = -100  # label of a token the loss skips (PyTorch's cross_entropy default)
ROLES = ("system", "user", "assistant")


class BadRecord(MiniCPMError):
    """One record cannot be used; the message says why."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the loss does not look

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class ChatDataset:
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why) of each bad record

    def __len__(self) -> int:
        return len(self.examples)


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs: "line N" for JSON Lines, "record N" for a JSON list (1-based).
    A line that is not JSON comes out as (where, BadRecord) so the caller can report it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MiniCPMError(f"{path}: not valid JSON ({exc})") from None
        for i, record in enumerate(records, 1):
            yield f"record {i}", record
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"line {number}", BadRecord(f"not valid JSON ({exc.msg})")


def _check_object(record: Any) -> None:
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")


def _non_empty_list(record: dict, key: str) -> list:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise BadRecord(f"'{key}' must be a non-empty list")
    return value


def to_messages(record: Any) -> list[dict[str, str]]:
    """The record as a list of {"role", "content"} messages ending with the assistant's turn."""
    _check_object(record)
    if "messages" in record:
        messages = _non_empty_list(record, "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadRecord(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}")
    elif "instruction" in record and "output" in record:
        fields = {k: record.get(k) for k in ("instruction", "input", "output", "system")}
        if not all(isinstance(v, str) for k, v in fields.items() if v is not None):
            raise BadRecord("instruction, input, output and system must be strings")
        prompt = fields["instruction"] + (f"\n{fields['input']}" if fields["input"] else "")
        messages = ([{"role": "system", "content": fields["system"]}] if fields["system"] else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    else:
        raise BadRecord("expected 'messages', or 'instruction' and 'output'")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadRecord("no assistant message with text: nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(tokenizer, messages: list[dict[str, str]], max_len: int | None = None) -> Example:
    """Token ids and labels of one conversation (see the module docstring)."""
    ids: list[int] = []
    labels: list[int] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True, tokenize=True) \
            if turn else []
        after = tokenizer.apply_chat_template(messages[:turn + 1], add_generation_prompt=False, tokenize=True)
        if before[:len(ids)] != ids or after[:len(before)] != before:
            raise BadRecord("the chat template renders earlier turns differently once later turns are added; "
                            "assistant tokens cannot be located")
        labels += [IGNORE_INDEX] * (len(before) - len(ids)) + after[len(before):]
        ids = after
    stops = set(tokenizer.stop_token_ids)
    if tokenizer.eos_token_id is not None and not stops.intersection(ids[-3:]):
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    example = Example(ids, labels)
    if example.trained_tokens == 0:
        raise BadRecord(f"no assistant token within the first {max_len} tokens")
    return example


def load_chat_dataset(path: str | Path, tokenizer, max_len: int | None = None, on_bad: str = "skip",
                      log=print) -> ChatDataset:
    """Every usable record of `path` as an Example; bad ones are reported (and skipped, or with
    on_bad="error" the first one raises, naming where it is)."""
    examples, skipped = convert_records(path, lambda r: render_chat(tokenizer, to_messages(r), max_len), on_bad, log)
    if not examples:
        raise MiniCPMError(f"{path}: no usable record ({len(skipped)} skipped)")
    return ChatDataset(examples, skipped)


def convert_records(path: str | Path, convert, on_bad: str, log) -> tuple[list, list[tuple[str, str]]]:
    """(convert(record) for every usable record, [(where, why)] of the bad ones): a bad record is
    reported and skipped, or with on_bad="error" raises, naming where it is."""
    if on_bad not in ("skip", "error"):
        raise MiniCPMError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    items, skipped = [], []
    for where, record in read_records(path):
        try:
            if isinstance(record, BadRecord):
                raise record
            items.append(convert(record))
        except BadRecord as exc:
            if on_bad == "error":
                raise BadRecord(f"{path}, {where}: {exc}") from None
            skipped.append((where, str(exc)))
            log(f"warning: {path}, {where}: skipped: {exc}")
    return items, skipped


# --- preference pairs (DPO) -----------------------------------------------------------------------
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class PreferencePair:
    chosen: Example  # prompt + the preferred reply; labels only on the reply (and eos)
    rejected: Example  # the same prompt tokens + the other reply


@dataclass
class PreferenceDataset:
    pairs: list[PreferencePair]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


def to_preference(record: Any) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages ending with a user turn, chosen reply, rejected reply) of a record:
    {"conversations": [{"from", "value"}...], "chosen": {...}|str, "rejected": ...} (sharegpt, as
    LLaMA-Factory writes it), {"messages": [{"role", "content"}...], "chosen", "rejected"}, or
    {"prompt": str, "chosen": str, "rejected": str}."""
    _check_object(record)
    if "conversations" in record:
        turns = _non_empty_list(record, "conversations")
        prompt = [_sharegpt_message(turn, f"conversations {i}") for i, turn in enumerate(turns)]
    elif "messages" in record:
        prompt = to_messages({"messages": record["messages"] + [{"role": "assistant", "content": "x"}]})[:-1]
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "content": record["prompt"]}]
    else:
        raise BadRecord("expected 'conversations', 'messages' or 'prompt', with 'chosen' and 'rejected'")
    if prompt[-1]["role"] != "user":
        raise BadRecord("the conversation must end with a user turn (the replies answer it)")
    chosen, rejected = (_reply(record.get(key), key) for key in ("chosen", "rejected"))
    return prompt, chosen, rejected


def _sharegpt_message(turn: Any, where: str) -> dict[str, str]:
    if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
        raise BadRecord(f"{where} must be {{'from': human, gpt or system, 'value': text}}")
    return {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}


def _reply(value: Any, key: str) -> str:
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str) or not value:
        raise BadRecord(f"'{key}' must be a non-empty reply (text, or a message with 'value'/'content')")
    return value


def render_pair(tokenizer, prompt: list[dict[str, str]], chosen: str, rejected: str,
                max_len: int | None = None) -> PreferencePair:
    """Both replies rendered after the same prompt; labels only on each reply (and eos)."""
    pair = PreferencePair(*(render_chat(tokenizer, prompt + [{"role": "assistant", "content": reply}], max_len)
                            for reply in (chosen, rejected)))
    if pair.chosen.input_ids == pair.rejected.input_ids:
        raise BadRecord("chosen and rejected are the same text after tokenization")
    return pair


def load_preference_dataset(path: str | Path, tokenizer, max_len: int | None = None, on_bad: str = "skip",
                            log=print) -> PreferenceDataset:
    """Every usable preference record of `path`; bad ones reported and skipped (or fatal with
    on_bad="error"), as load_chat_dataset does."""
    pairs, skipped = convert_records(path, lambda r: render_pair(tokenizer, *to_preference(r), max_len), on_bad, log)
    if not pairs:
        raise MiniCPMError(f"{path}: no usable preference pair ({len(skipped)} skipped)")
    return PreferenceDataset(pairs, skipped)
