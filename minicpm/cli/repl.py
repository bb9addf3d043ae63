"""The interactive chat loop of `minicpm chat`: streaming replies, /reset, /exit, tokens/s."""

from __future__ import annotations

import sys

from minicpm.generation.chat import stream_chat
from minicpm.generation.generate import PromptCache
from minicpm.generation.text import GenerationStats

HELP = "commands: /reset (new conversation), /exit (quit); Ctrl-C stops a reply"


def chat_loop(model, tokenizer, sampling: dict, system: str | None = None,
              stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    dim = ("\033[2m", "\033[0m") if stdout.isatty() else ("", "")
    history = _fresh(system)
    prompt_cache = PromptCache()  # the conversation so far stays in the KV cache between turns
    print(f"{dim[0]}{HELP}{dim[1]}", file=stdout, flush=True)
    while True:
        if interactive:
            try:
                query = input(">>> ")
            except EOFError:
                print(file=stdout)
                return 0
            except KeyboardInterrupt:  # like a shell: drop the line, keep the session
                print(f"\n{dim[0]}(use /exit or Ctrl-D to quit){dim[1]}", file=stdout, flush=True)
                continue
        else:
            stdout.write(">>> ")
            line = stdin.readline()
            if not line:
                print(file=stdout)
                return 0
            query = line.rstrip("\n")
            print(query, file=stdout)
        command = query.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history, prompt_cache = _fresh(system), PromptCache()
            print(f"{dim[0]}(conversation cleared){dim[1]}", file=stdout, flush=True)
            continue
        if command.startswith("/"):
            print(f"{dim[0]}unknown command {command}; {HELP}{dim[1]}", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": query})
        reply, stats = _stream_reply(model, tokenizer, history, sampling, stdout, prompt_cache)
        history.append({"role": "assistant", "content": reply})
        print(f"\n{dim[0]}[first token in {stats.prefill_seconds:.2f} s "
              f"(prompt {stats.prompt_tokens} tokens, {stats.cached_prompt_tokens} cached), "
              f"then {stats.decode_tokens_per_second:.1f} tok/s; {stats.new_tokens} tokens]{dim[1]}",
              file=stdout, flush=True)


def _fresh(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _stream_reply(model, tokenizer, history, sampling, stdout,
                  prompt_cache) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    pieces = []
    try:
        for piece in stream_chat(model, tokenizer, history, stats=stats, prompt_cache=prompt_cache,
                                 **sampling):
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write(" [stopped]")
    return "".join(pieces), stats
