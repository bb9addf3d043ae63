"""The interactive chat loop of `minicpm chat`: streaming replies, /reset, /image, /exit, tokens/s.

The loop talks to a conversation object (`minicpm.cli.conversations` for PyTorch models,
`minicpm.lean.chat.LeanChat` for the torch-free runtime): `image` (None for text models),
`reset()`, `set_image(path)`, `reply(query, sampling, stats)` (an iterator of text pieces that
fills a GenerationStats) and `record(query, reply)`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from minicpm.errors import MiniCPMError
from minicpm.generation.text import GenerationStats

HELP = ("commands: /reset (new conversation), /image PATH (talk about an image; /image alone drops it), "
        "/exit (quit); Ctrl-C stops a reply")


def chat_loop(chat, sampling: dict, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    dim = ("\033[2m", "\033[0m") if stdout.isatty() else ("", "")

    def note(text: str) -> None:
        print(f"{dim[0]}{text}{dim[1]}", file=stdout, flush=True)

    note(HELP)
    if chat.image is not None:
        note(f"(image {chat.image.width}x{chat.image.height} attached)")
    while True:
        query = _read(interactive, stdin, stdout, note)
        if query is None:
            return 0
        command = query.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat.reset()
            note("(conversation cleared)")
            continue
        if command == "/image" or command.startswith("/image "):
            path = command.removeprefix("/image").strip() or None
            try:
                note(f"({chat.set_image(path)})")
            except MiniCPMError as e:  # the session goes on
                print(f"error: {e}", file=stdout, flush=True)
            continue
        if command.startswith("/"):
            note(f"unknown command {command}; {HELP}")
            continue
        stats = GenerationStats()
        try:
            reply = _stream_reply(chat.reply(query, sampling, stats), stdout)
        except MiniCPMError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"error: {e}", file=stdout, flush=True)
            continue
        chat.record(query, reply)
        note(f"\n[first token in {stats.prefill_seconds:.2f} s "
             f"(prompt {stats.prompt_tokens} tokens, {stats.cached_prompt_tokens} cached), "
             f"then {stats.decode_tokens_per_second:.1f} tok/s; {stats.new_tokens} tokens]")


def _read(interactive: bool, stdin, stdout, note) -> str | None:
    """The next line typed (None at the end of input)."""
    while interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=stdout)
            return None
        except KeyboardInterrupt:  # like a shell: drop the line, keep the session
            note("\n(use /exit or Ctrl-D to quit)")
    stdout.write(">>> ")
    line = stdin.readline()
    if not line:
        print(file=stdout)
        return None
    query = line.rstrip("\n")
    print(query, file=stdout)
    return query


def _stream_reply(pieces: Iterator[str], stdout) -> str:
    out = []
    try:
        for piece in pieces:
            out.append(piece)
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write(" [stopped]")
    return "".join(out)
