"""The serving engine's prefix cache: a chat's next turn, re-sent whole, takes the slot that holds
its history and prefills only whole chunks past it, and its reply is token for token and logprob
for logprob what an engine without the cache gives."""

from __future__ import annotations

import pytest
from test_engine import build, drive, greedy, prompt, tokens

from minicpm.serving.engine import Engine, Request

CHUNK = 8


@pytest.fixture(scope="module", params=["bf16", "int4"])
def model(request):
    return build(request.param)


def conversation(engine: Engine, first: list[int], follow_up: list[int]) -> list[list]:
    """Turn one, then turn two = turn one's prompt + its reply + `follow_up` (as a client re-sends it)."""
    one = list(drive(engine, {0: [Request(first, greedy(5), logprobs=2)]})[0])
    second = first + tokens(one) + follow_up
    two = list(drive(engine, {0: [Request(second, greedy(5), logprobs=2)]})[0])
    return [one, two]


def test_next_turn_reuses_whole_chunks_and_answers_as_without_the_cache(model):
    first, follow_up = prompt(30, seed=1), prompt(6, seed=2)
    cached = Engine(model, max_batch=2, prefill_chunk=CHUNK)
    plain = Engine(model, max_batch=2, prefill_chunk=CHUNK, prefix_cache=False)
    with_cache, without = conversation(cached, first, follow_up), conversation(plain, first, follow_up)
    for a, b in zip(with_cache, without):
        assert tokens(a) == tokens(b)
        assert [e.logprob for e in a] == [e.logprob for e in b]
    # turn two shares turn one's 30 prompt tokens: 24 of them in whole chunks of 8 (the reply's
    # positions were written by decode steps, and are prefilled again)
    assert cached.counters["prefix_cache_hits"] == 1 and cached.counters["prefix_cache_tokens"] == 24
    assert plain.counters["prefix_cache_hits"] == 0
    second_prompt = 30 + 5 + 6
    assert cached.counters["prompt_tokens"] == 30 + second_prompt - 24
    assert plain.counters["prompt_tokens"] == 30 + second_prompt


def test_int4_kv_cache_reuses_whole_key_blocks(model):
    """An int4 KV cache resumes writing only at a block of 32 keys: reuse is whole chunks that
    end on a block, and the reply is still token for token and logprob for logprob the same."""
    first, follow_up = prompt(70, seed=7), prompt(6, seed=8)
    cached = Engine(model, max_batch=2, prefill_chunk=CHUNK, kv_dtype="int4")
    plain = Engine(model, max_batch=2, prefill_chunk=CHUNK, kv_dtype="int4", prefix_cache=False)
    with_cache, without = conversation(cached, first, follow_up), conversation(plain, first, follow_up)
    for a, b in zip(with_cache, without):
        assert tokens(a) == tokens(b)
        assert [e.logprob for e in a] == [e.logprob for e in b]
    assert cached.counters["prefix_cache_hits"] == 1 and cached.counters["prefix_cache_tokens"] == 64


def test_each_conversation_finds_its_own_slot_and_least_recent_is_evicted(model):
    engine = Engine(model, max_batch=2, prefill_chunk=CHUNK)
    a, b, c = prompt(20, seed=3), prompt(20, seed=4), prompt(20, seed=5)
    drive(engine, {0: [Request(a, greedy(2))], 1: [Request(b, greedy(2))]})
    # both slots hold a conversation: a's next turn finds a's 16, then b's finds b's
    drive(engine, {0: [Request(a + [7, 8, 9], greedy(2))]})
    drive(engine, {0: [Request(b + [7, 8, 9], greedy(2))]})
    assert engine.counters["prefix_cache_hits"] == 2 and engine.counters["prefix_cache_tokens"] == 32
    # a new conversation takes the slot released longest ago (a's); b's stays and is found
    drive(engine, {0: [Request(c, greedy(2))]})
    drive(engine, {0: [Request(b + [7, 8, 9, 10], greedy(2))]})
    drive(engine, {0: [Request(a + [1], greedy(2))]})
    assert engine.counters["prefix_cache_hits"] == 3 and engine.counters["prefix_cache_tokens"] == 48


def test_prompt_logprobs_and_short_prefixes_prefill_everything(model):
    engine = Engine(model, max_batch=1, prefill_chunk=CHUNK)
    first = prompt(20, seed=6)
    drive(engine, {0: [Request(first, greedy(1))]})
    scored = drive(engine, {0: [Request(first + [5], greedy(1), prompt_logprobs=1)]})[0]
    assert engine.counters["prefix_cache_hits"] == 0  # every prompt position needs its logits
    assert len(scored.prompt_logprobs) == 21 and engine.counters["prompt_tokens"] == 20 + 21
    drive(engine, {0: [Request(first[:7] + [9, 9], greedy(1))]})  # 7 shared tokens: less than a chunk
    assert engine.counters["prefix_cache_hits"] == 0


def metric(url: str, name: str) -> float:
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_openai_client_second_turn_through_the_server(tmp_path):
    """Two real servers (with and without the prefix cache), the openai client, a chat's two
    turns: the same replies and logprobs; only the cached server reports reuse."""
    import openai

    from tests.conftest import save_tiny_checkpoint
    from tests.server_process import start_server, stop_server

    checkpoint = save_tiny_checkpoint(tmp_path, context=1024)
    system = "You answer questions about this text. " + "The museum opens at nine and closes at five. " * 30
    answers, servers = {}, {"cached": (), "plain": ("--no-prefix-cache",)}
    for name, flags in servers.items():
        proc, url = start_server(checkpoint, "--prefill-chunk", "32", *flags)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": "When does it open?"}]
            replies = []
            for follow_up in ("And when does it close?", None):
                done = client.chat.completions.create(model="tiny-minicpm", messages=messages, temperature=0, max_tokens=8,
                                                      logprobs=True)
                choice = done.choices[0]
                replies.append((choice.message.content, [t.logprob for t in choice.logprobs.content],
                                done.usage.prompt_tokens))
                if follow_up:
                    messages += [{"role": "assistant", "content": choice.message.content},
                                 {"role": "user", "content": follow_up}]
            answers[name] = replies
            hits, reused = metric(url, "minicpm_prefix_cache_hits"), metric(url, "minicpm_prefix_cache_reused_tokens")
        finally:
            stop_server(proc)
        if name == "cached":
            first_prompt = replies[0][2]
            assert hits == 1 and first_prompt - 32 < reused <= first_prompt and reused % 32 == 0
        else:
            assert hits == 0 and reused == 0
    assert answers["cached"] == answers["plain"]
