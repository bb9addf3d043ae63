"""Serving prefix cache: time to first token of a chat's second turn, with and without it.

Starts `minicpm serve` twice on the same model (the default one unless --model), with and
without `--no-prefix-cache`, and runs the same two-turn chat through the openai client: a
system message of about --context tokens (WikiText-2 text shipped with the package), a question,
the reply, a follow-up, as a client re-sends it. Prints TTFT per turn, the second turn's speed-up,
and whether both servers gave the same replies (greedy).

    .venv/bin/python benchmarks/prefix_cache.py [--model PATH] [--context 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time

import httpx
import openai
from serving import VENV_BIN, Server, free_port, start, stop  # benchmarks/serving.py

QUESTIONS = ("What is this text about? Answer in one sentence.", "Name one person it mentions.")


def start_ours(model: str | None, threads: int, *flags: str) -> tuple[subprocess.Popen, str]:
    """`minicpm serve` on a free port, started and awaited by the serving benchmark's helpers."""
    command = [str(VENV_BIN / "minicpm"), "serve", *([model] if model else []), "--port", "{port}",
               "--threads", str(threads), *flags]
    port = free_port()
    return start(Server("ours", "as stored", command), port), f"http://127.0.0.1:{port}"


def document(tokens: int) -> str:
    """About `tokens` tokens of WikiText-2 (4 characters a token is near enough: the table prints
    the real count)."""
    from minicpm.evaluation.ppl import read_data

    text = read_data("wikitext2").text
    return text[1000: 1000 + tokens * 4]  # past the first headings


def turn(client: openai.OpenAI, name: str, messages: list[dict]) -> tuple[str, float, int]:
    """(reply, seconds to the first token, prompt tokens) of one streamed greedy turn."""
    start = time.perf_counter()
    first, parts, usage = None, [], None
    for chunk in client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=32,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.prompt_tokens
    return "".join(parts), (first or time.perf_counter()) - start, usage


def chat(url: str, text: str) -> list[tuple[str, float, int]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1200)
    name = client.models.list().data[0].id
    messages = [{"role": "system", "content": "Answer questions about this text.\n\n" + text}]
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        turns.append(turn(client, name, messages))
        messages.append({"role": "assistant", "content": turns[-1][0]})
    return turns


def reused_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^minicpm_prefix_cache_reused_tokens (\S+)$", text, re.M).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint or GGUF (default: the default model)")
    parser.add_argument("--context", type=int, default=2000, help="approximate system-message tokens")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    text = document(args.context)
    results = {}
    for label, flags in (("prefix cache", ()), ("--no-prefix-cache", ("--no-prefix-cache",))):
        proc, url = start_ours(args.model, args.threads, *flags)
        try:
            results[label] = (chat(url, text), reused_tokens(url))
        finally:
            stop(proc)
    print(f"model: {args.model or 'the default model'}; threads {args.threads}; greedy, 32 new tokens a turn\n")
    print("| server | turn 1 prompt | turn 1 TTFT s | turn 2 prompt | turn 2 TTFT s | turn 1 / turn 2 | reused tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, (turns, reused) in results.items():
        (_, t1, p1), (_, t2, p2) = turns
        print(f"| {label} | {p1} | {t1:.2f} | {p2} | {t2:.2f} | {t1 / t2:.1f}x | {reused:.0f} |")
    same = [t[0] for t in results["prefix cache"][0]] == [t[0] for t in results["--no-prefix-cache"][0]]
    print(f"\nreplies identical with and without the cache: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
