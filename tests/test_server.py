"""`minicpm serve` as a real process on loopback, driven by the official `openai` client, raw HTTP
and a burst of concurrent streams; answers are checked against the model run in this process."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from tests.server_process import KEY, auth, error_of, start_server, stop_server


def greedy_text(local, prompt_ids: list[int], n: int) -> str:
    model, tokenizer = local
    ids = model.generate(prompt_ids, max_new_tokens=n, stop_token_ids=[])
    return tokenizer.decode(ids, skip_special_tokens=True)


PROMPTS = ["The capital of France is", "Once upon a time", "1 2 3 4", "Hello", "What is the weather",
           "A B C", "red green blue", "north south"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-minicpm"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_completion_matches_local_greedy(client, local):
    _, tokenizer = local
    for prompt in PROMPTS[:3]:
        reply = client.completions.create(model="tiny-minicpm", prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text == greedy_text(local, tokenizer.encode(prompt), 12)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 12
        assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    whole = client.chat.completions.create(model="tiny-minicpm", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-minicpm", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_raw_sse_format(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["id"] for p in payloads}) == 1


def test_async_client_concurrent_streams_match_sequential(server, client):
    """16 streams at once: all complete, none lost, each equal to the same request alone."""
    sequential = [client.completions.create(model="tiny-minicpm", prompt=p, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
                  for p in PROMPTS * 2]

    async def burst() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(model="tiny-minicpm", prompt=prompt, max_tokens=10,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        try:
            return await asyncio.gather(*(one(p) for p in PROMPTS * 2))
        finally:
            await aclient.close()

    assert asyncio.run(burst()) == sequential


def test_echo_logprobs_score_the_prompt_like_a_forward_pass(client, local):
    """What lm-evaluation-harness's local-completions model sends to score a continuation."""
    model, tokenizer = local
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    reply = client.completions.create(model="tiny-minicpm", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    expected = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=2e-3)
    # the 2 most likely tokens, and the echoed one too where it is not among them (as OpenAI does)
    for token, top, v in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert len(top) in (2, 3) and top[token] == v and max(top.values()) >= v - 1e-6
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model="tiny-minicpm", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert math.exp(entry.logprob) <= 1.0


def test_stop_string_across_token_boundary(client, local):
    _, tokenizer = local
    prompt = "Once upon a time"
    full = client.completions.create(model="tiny-minicpm", prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    ids = tokenizer.encode(full, add_special_tokens=False)
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    # a stop string that starts inside one token and ends inside the next
    boundary = next(len(p) for p in pieces[2:] if 2 <= len(p) < len(full) - 2)
    stop = full[boundary - 1:boundary + 1]
    cut = full.index(stop)
    reply = client.completions.create(model="tiny-minicpm", prompt=prompt, max_tokens=16, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[:cut]
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_with_seed_repeat(client):
    kwargs = dict(model="tiny-minicpm", prompt="Hello", max_tokens=8, temperature=1.0, n=3, seed=7)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    again = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == again and len(first) == 3
    assert len(set(first)) > 1  # each choice has its own seed


def test_batch_of_token_prompts(client, local):
    _, tokenizer = local
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    reply = client.completions.create(model="tiny-minicpm", prompt=prompts, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [greedy_text(local, p, 6) for p in prompts]


def test_tokenize_detokenize_round_trip(server, local):
    _, tokenizer = local
    text = "Rivers run to the sea."
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": text}, headers=auth()).json()
    assert tokens["tokens"] == tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    back = httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}, headers=auth()).json()
    assert back["prompt"] == tokenizer.decode(tokens["tokens"])
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      headers=auth()).json()
    assert chat["tokens"] == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)


@pytest.mark.parametrize("body,status,param", [
    ('{"messages": [', 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, 400,
     "response_format.type"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
])
def test_bad_chat_requests(server, body, status, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{server}/v1/chat/completions", headers={**auth(), "content-type": "application/json"},
                   **kwargs)
    assert r.status_code == status
    err = error_of(r)
    assert err["param"] == param and err["message"]


def test_bad_completion_requests(server):
    post = lambda body: httpx.post(f"{server}/v1/completions", json=body, headers=auth())  # noqa: E731
    err = error_of(r := post({"prompt": "hi", "max_tokens": 0}))
    assert r.status_code == 400 and err["param"] == "max_tokens"
    err = error_of(r := post({"prompt": [10**9], "max_tokens": 2}))
    assert r.status_code == 400 and "vocabulary" in err["message"]
    err = error_of(r := post({"prompt": "hi", "suffix": "x"}))
    assert r.status_code == 400 and err["param"] == "suffix"


def test_prompt_over_the_context_names_the_lengths(server):
    long = " ".join(["word"] * 300)
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth(),
                   json={"messages": [{"role": "user", "content": long}], "max_tokens": 10})
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert 256 in numbers and 10 in numbers and any(n > 256 for n in numbers)


def test_wrong_or_missing_key(server):
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # health and metrics stay open


def test_disconnect_frees_the_slot(long_server):
    server = long_server  # replies of up to 4000 tokens: still running when the client hangs up
    body = {"prompt": "Once", "max_tokens": 4000, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert httpx.get(f"{server}/health").json()["running"] == 1
    deadline = time.time() + 10
    while httpx.get(f"{server}/health").json()["running"] != 0:
        assert time.time() < deadline, "the slot of a disconnected client was not freed"
        time.sleep(0.05)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'minicpm_finished_sequences_total{reason="cancelled"}' in metrics


def test_metrics_count_requests_and_tokens(server, client):
    def value(text: str, name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = httpx.get(f"{server}/metrics").text
    client.completions.create(model="tiny-minicpm", prompt="Hello", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = httpx.get(f"{server}/metrics").text
    assert value(after, "minicpm_generation_tokens_total") - value(before, "minicpm_generation_tokens_total") == 5
    key = 'minicpm_requests_total{endpoint="/v1/completions",status="200"}'
    assert value(after, key) == value(before, key) + 1
    assert "minicpm_queue_depth 0.0" in after and "minicpm_time_to_first_token_seconds_count" in after


def test_web_chat_page_is_served(server):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()


def test_queue_full_is_429_with_retry_after(checkpoint):
    proc, url = start_server(checkpoint, "--max-batch", "1", "--max-queue", "1")
    try:
        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "Once", "max_tokens": 60, "ignore_eos": True}
                return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(6)))

        responses = asyncio.run(flood())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes  # one slot + one queue place, six requests
        busy = next(r for r in responses if r.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1 and error_of(busy)["type"] == "rate_limit_error"
    finally:
        stop_server(proc)


def test_taken_port_is_a_clear_error(server, checkpoint):
    port = server.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "minicpm.cli.main", "serve", str(checkpoint), "--port", port],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_json_object_response_format(client):
    from minicpm.generation.json_mode import START, run

    reply = client.chat.completions.create(model="tiny-minicpm", messages=[{"role": "user", "content": "JSON"}],
                                           max_tokens=40, temperature=0.8, seed=1,
                                           response_format={"type": "json_object"})
    text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text.lstrip().startswith("{") and run(START, text) is not None  # a valid prefix, at least
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the random model ran out of tokens inside the object
        assert reason == "length" and reply.usage.completion_tokens == 40


def test_out_of_range_port_is_a_clear_error(checkpoint):
    r = subprocess.run([sys.executable, "-m", "minicpm.cli.main", "serve", str(checkpoint), "--port", "99999"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port must be in [0, 65535]" in r.stderr and "Traceback" not in r.stderr
