"""Soak test of `minicpm serve`: many clients for a long time, random cancellations, bad requests.

A real server process serves the model (default: SmolLM2-135M-Instruct in bf16, 16 slots). First,
each of a pool of prompts is run alone (greedy, a fixed reply length each): those replies are the
reference. Then --clients clients loop for --minutes: each picks a prompt, streams it or not, and
about a quarter of the time hangs up part-way (closing the connection: mid-stream, or while waiting
for a non-streamed answer); now and then a client sends
a malformed body instead. At the end:
  - every reply that ran to the end equals its reference exactly (greedy output must not depend
    on what else is in the batch), and has the reference's length;
  - malformed bodies got 400 with OpenAI's error body; nothing else failed;
  - once the clients stop, /health shows no running and no waiting request (cancelled slots were
    freed).
Exit status 1 if any of that fails.

    python benchmarks/soak.py [--minutes 10] [--clients 24] [MODEL --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Server, free_port, start, stop  # noqa: E402  (benchmarks/serving.py)

VENV_BIN = Path(sys.executable).parent
PROMPTS = ["Name three rivers in France.", "What is the capital of Italy?", "Write a haiku about snow.",
           "Explain photosynthesis in one sentence.", "List the planets of the solar system.",
           "What is 12 times 7?", "Give me a synonym for happy.", "Translate 'good morning' to French.",
           "Why is the sky blue?", "Describe a cat in five words.", "What does a compiler do?",
           "Suggest a name for a bakery."]


def body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True}


async def reply(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stream: bool,
                hang_up_after: int | None = None, give_up_after_s: float | None = None) -> tuple[str, str | None]:
    """(text, finish_reason); finish_reason None when we hung up first (after `hang_up_after`
    stream chunks, or `give_up_after_s` seconds of waiting for a non-streamed answer)."""
    if not stream:
        try:  # cancelling the request closes its connection: the server sees a hang-up
            r = await asyncio.wait_for(client.post(f"{url}/v1/chat/completions",
                                                   json=body(prompt, max_tokens, False)), give_up_after_s)
        except asyncio.TimeoutError:
            return "", None
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, reason, chunks = "", None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body(prompt, max_tokens, True)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            reason = choice["finish_reason"] or reason
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return text, None  # leaving the block closes the connection mid-stream
    return text, reason


async def soak(url: str, minutes: float, clients: int, lengths: dict[str, int], reference: dict[str, str],
               seed: int) -> Counter:
    counts: Counter = Counter()
    deadline = time.time() + minutes * 60
    rng = random.Random(seed)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.time() < deadline:
            prompt = rng.choice(PROMPTS)
            roll = rng.random()
            if roll < 0.05:
                r = await client.post(f"{url}/v1/chat/completions", content=b'{"messages": [',
                                      headers={"content-type": "application/json"})
                ok = r.status_code == 400 and set(r.json()) == {"error"}
                counts["malformed: 400" if ok else f"malformed: unexpected {r.status_code}"] += 1
                continue
            stream = roll < 0.7
            leave = rng.random() < 0.25
            hang_up = rng.randint(1, lengths[prompt]) if stream and leave else None
            give_up_s = rng.uniform(0.05, 2.0) if not stream and leave else None
            try:
                text, reason = await reply(client, url, prompt, lengths[prompt], stream, hang_up, give_up_s)
            except httpx.HTTPStatusError as exc:
                counts[f"HTTP {exc.response.status_code}"] += 1
                continue
            if reason is None:
                counts["cancelled by the client"] += 1
            elif text == reference[prompt] and reason == "length":
                counts["complete and equal to the reference"] += 1
            else:
                counts["MISMATCH"] += 1
                print(f"mismatch for {prompt!r}: {text!r} ({reason}) vs {reference[prompt]!r}", flush=True)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the default model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=24, help="concurrent clients (more than the 16 slots)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cmd = [str(VENV_BIN / "minicpm"), "serve", *([args.model] if args.model else []), "--port", "{port}",
           "--threads", str(args.threads), "--dtype", args.dtype, "--max-batch", "16", "--max-queue", "256"]
    port = free_port()
    proc = start(Server("ours", args.dtype, cmd), port)
    url = f"http://127.0.0.1:{port}"
    try:
        rng = random.Random(args.seed)
        lengths = {p: rng.randint(8, 48) for p in PROMPTS}

        async def references() -> dict[str, str]:
            async with httpx.AsyncClient(timeout=600) as client:
                return {p: (await reply(client, url, p, lengths[p], stream=False))[0] for p in PROMPTS}

        reference = asyncio.run(references())
        print(f"references: {len(reference)} prompts run alone; soaking {args.minutes} min with "
              f"{args.clients} clients ...", flush=True)
        start_time = time.time()
        counts = asyncio.run(soak(url, args.minutes, args.clients, lengths, reference, args.seed))
        elapsed = time.time() - start_time
        time.sleep(1.0)
        health = httpx.get(f"{url}/health").json()
    finally:
        stop(proc)
    for key, n in sorted(counts.items()):
        print(f"  {key}: {n}")
    print(f"  elapsed {elapsed / 60:.1f} min; after the clients stopped: running {health['running']}, "
          f"waiting {health['waiting']}; engine generated {health['generated_tokens']} tokens")
    bad = {k: n for k, n in counts.items() if k not in ("complete and equal to the reference", "malformed: 400",
                                                        "cancelled by the client")}
    if bad or health["running"] or health["waiting"]:
        print(f"FAILED: {bad or health}")
        return 1
    print("passed: no request lost or corrupted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
