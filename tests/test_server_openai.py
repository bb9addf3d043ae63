"""`minicpm serve` against what OpenAI's API does and what its clients rely on: abandoned requests
of every kind give their slot back, retrieving a model, logit_bias, logprobs that cover exactly
the returned text, refusing what is not supported, admitting a many-prompt request all or none,
and metrics labelled by route."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from urllib.parse import urlparse

import httpx
import openai
import pytest

from tests.server_process import KEY, auth, error_of, start_server, stop_server

MODEL = "tiny-minicpm"


def running(url: str) -> int:
    return httpx.get(f"{url}/health").json()["running"]


def wait_until_idle(url: str, seconds: float) -> float:
    """Seconds until no sequence runs; fails after `seconds`."""
    start = time.time()
    while running(url) != 0:
        assert time.time() - start < seconds, f"a slot was still taken after {seconds} s"
        time.sleep(0.02)
    return time.time() - start


def hang_up_after(url: str, path: str, body: dict, seconds: float) -> None:
    """Send a request over a raw socket, read nothing, and close the connection after `seconds`."""
    where = urlparse(url)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((where.hostname, where.port)) as conn:
        conn.sendall(head + data)
        deadline = time.time() + 10
        while running(url) == 0:  # the request has reached the engine
            assert time.time() < deadline, "the request never started"
            time.sleep(0.02)
        time.sleep(seconds)
        assert running(url) == 1, "the request ended before the client hung up: make it longer"



@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Once"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Once"}]}),
    ("/v1/completions", {"prompt": "Once", "stream": True}),
])
def test_a_client_that_hangs_up_frees_its_slot_within_a_second(long_server, path, body):
    body = {**body, "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    hang_up_after(long_server, path, body, seconds=0.5)
    assert wait_until_idle(long_server, seconds=1.0) < 1.0
    assert httpx.get(f"{long_server}/health").json()["waiting"] == 0


def test_sixteen_abandoned_requests_leave_room_for_the_next(long_server):
    async def abandon_all() -> None:
        async with httpx.AsyncClient(headers=auth(), timeout=httpx.Timeout(1.0)) as http:
            body = {"prompt": "Once", "max_tokens": 4000, "ignore_eos": True}
            calls = [http.post(f"{long_server}/v1/completions", json=body) for _ in range(16)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, httpx.TimeoutException) for r in results)  # each one hung up

    asyncio.run(abandon_all())
    wait_until_idle(long_server, seconds=5.0)
    start = time.time()
    r = httpx.post(f"{long_server}/v1/completions", headers=auth(), timeout=30,
                   json={"prompt": "Once", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and time.time() - start < 5


def test_retrieve_the_model(client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_logit_bias_forces_and_bans_tokens(client, local):
    model, tokenizer = local
    forced = tokenizer.encode(" river", add_special_tokens=False)[-1]
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=0,
                                      logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].logprobs.tokens == [tokenizer.decode([forced])] * 4
    first = model.generate(tokenizer.encode("Hello"), max_new_tokens=1, stop_token_ids=[])[0]
    banned = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0, logprobs=1,
                                       logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    lp = banned.choices[0].logprobs
    # the greedy choice is gone; its (unbiased) logprob still ranks first among the alternatives
    assert lp.tokens[0] != tokenizer.decode([first]) and tokenizer.decode([first]) in lp.top_logprobs[0]


def test_legacy_top_logprobs_always_hold_the_chosen_token(client):
    reply = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=2.0,
                                      seed=3, logprobs=1, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert all(token in top and len(top) <= 2 for token, top in zip(lp.tokens, lp.top_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs)  # sampled tokens outside the top 1 occur


def test_chat_logprobs_cover_the_returned_content_only(client, local):
    _, tokenizer = local
    messages = [{"role": "user", "content": "Tell me a story"}]
    ask = dict(model=MODEL, messages=messages, temperature=0, logprobs=True, top_logprobs=1)
    full = client.chat.completions.create(max_tokens=12, **ask)
    text, entries = full.choices[0].message.content, full.choices[0].logprobs.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(max_tokens=12, stop=[stop], **ask)
    kept = cut.choices[0].logprobs.content
    assert cut.choices[0].message.content == text[:text.index(stop)]
    # the token that completed the stop string is not part of the reply, nor of its logprobs
    assert len(kept) == cut.usage.completion_tokens - 1
    assert [e.token for e in kept] == [e.token for e in entries[:len(kept)]]
    # a reply ended by the end-of-turn token: that token is not listed either
    eos = tokenizer.stop_token_ids[0]
    ended = client.chat.completions.create(max_tokens=12, logit_bias={str(eos): 100}, **ask)
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].message.content == ""
    assert ended.choices[0].logprobs.content == [] and ended.usage.completion_tokens == 1


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"3": 101}}, "logit_bias.3"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logit_bias": {str(10**6): 5}}, None),
])
def test_what_is_not_supported_is_refused(server, path, extra, param):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{server}{path}", json={**base, "max_tokens": 2, **extra}, headers=auth())
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param
    assert ("vocabulary" in err["message"]) if param is None else err["message"]


def test_supported_values_of_those_fields_are_accepted(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, tool_choice="none")
    assert reply.choices[0].message.content is not None
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=1).choices


def test_a_request_is_admitted_whole_or_not_at_all(long_checkpoint):
    proc, url = start_server(long_checkpoint, "--max-batch", "2", "--max-queue", "2")
    try:
        never = httpx.post(f"{url}/v1/completions", json={"prompt": ["a"] * 5, "max_tokens": 2})
        assert never.status_code == 400 and "can never be served" in error_of(never)["message"]
        # one long request runs; four more prompts exceed the one free slot plus the queue of 2
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()  # kept: closing it would hang up
            next(line for line in lines if line.startswith("data: "))
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": ["a"] * 4, "max_tokens": 2})
            assert busy.status_code == 429
            assert httpx.get(f"{url}/health").json()["waiting"] == 0  # nothing of it was queued
            fits = httpx.post(f"{url}/v1/completions", json={"prompt": ["a"] * 3, "max_tokens": 2})
            assert fits.status_code == 200 and len(fits.json()["choices"]) == 3
    finally:
        stop_server(proc)


def test_metrics_label_requests_by_route_not_by_path(server):
    for path in ("/no/such/path/1", "/no/such/path/2", "/v1/models/unknown-model"):
        httpx.get(f"{server}{path}", headers=auth())
    text = httpx.get(f"{server}/metrics").text
    endpoints = set(re.findall(r'minicpm_requests_total\{endpoint="([^"]*)"', text))
    assert "unmatched" in endpoints and "/v1/models/{model_id:path}" in endpoints
    assert not any("/no/such" in e or "unknown-model" in e for e in endpoints)
