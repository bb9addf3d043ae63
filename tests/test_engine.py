"""The continuous-batching engine (minicpm.serving.engine) on tiny seeded models.

Most tests drive the scheduler by hand (`engine.step()` without the thread), so which request
arrives at which step is exact; a few run the real thread (sync and asyncio consumers, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
import torch
from conftest import FIXTURES, random_model, variant_config

from minicpm.errors import MiniCPMError
from minicpm.generation.sampling import SamplingParams, apply_presence_frequency, sample_next
from minicpm.kernels.linear import KERNEL as LINEAR_BF16
from minicpm.kernels.linear import KERNEL_F32 as LINEAR_F32
from minicpm.quantization import quantize_model
from minicpm.serving.engine import Engine, EngineClosed, QueueFull, Request
from minicpm.tokenizer import Tokenizer

VOCAB = 1600  # the fixture tokenizer's
CONTEXT = 96


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")


def build(weights: str):
    config = variant_config("1b", vocab_size=VOCAB, max_position_embeddings=CONTEXT)
    model = random_model(config, seed=5, dtype=torch.float32 if weights == "fp32" else torch.bfloat16)
    if weights == "int4":
        quantize_model(model, bits=4, group_size=32, head="int8")
    return model.eval()


@pytest.fixture(scope="module", params=["bf16", "fp32", "int4"])
def model(request):
    return build(request.param)


@pytest.fixture(scope="module")
def bf16_model():
    return build("bf16")


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def greedy(n_new: int, **kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": n_new, "stop_token_ids": [], **kw})


def drive(engine: Engine, arrivals: dict[int, list[Request]]) -> list:
    """Run the scheduler by hand; the requests of arrivals[i] are submitted before step i."""
    streams, step = [], 0
    while arrivals or any(s.finish_reason is None for s in streams):
        streams += [engine.submit(r) for r in arrivals.pop(step, [])]
        engine.step()
        step += 1
    return streams


def run_alone(engine: Engine, request: Request) -> list:
    return list(drive(engine, {0: [request]})[0])


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


# ---------------------------------------------------------------- batch invariance

def assert_alone_equals_busy_batch(model) -> None:
    """Ten requests of different lengths arriving at different steps (some while others are
    still prefilling in small chunks) give the tokens, and bit for bit the logprobs, of each
    request run alone; and alone they give what model.generate gives."""
    if LINEAR_BF16.library() is None or LINEAR_F32.library() is None:
        pytest.skip("rows are independent of the batch with the native decode Linear kernels only")
    engine = Engine(model, max_batch=8, prefill_chunk=16)
    requests = [Request(prompt(3 + 7 * i, seed=i), greedy(6 + i % 4), logprobs=2) for i in range(10)]
    alone = [run_alone(engine, r) for r in requests]
    arrivals = {0: requests[:3], 1: requests[3:6], 4: requests[6:9], 9: requests[9:]}
    together = [list(s) for s in drive(engine, arrivals)]  # 10 requests, 8 slots: some wait
    for one, many, asked in zip(alone, together, requests):
        assert tokens(one) == tokens(many)
        assert [e.logprob for e in one] == [e.logprob for e in many]
        assert many[-1].finish_reason == "length" and len(tokens(many)) == asked.params.max_new_tokens
    reference = model.generate(requests[5].prompt_ids, max_new_tokens=7, stop_token_ids=[])
    assert tokens(alone[5]) == reference
    assert engine.stats()["running"] == 0 and engine.counters["generated_tokens"] == 2 * sum(map(len, alone))


def test_greedy_alone_equals_busy_batch(model):
    assert_alone_equals_busy_batch(model)


def test_greedy_alone_equals_busy_batch_with_pytorch_attention(monkeypatch):
    """Without the native attention kernel each row attends over its own positions in PyTorch."""
    from minicpm.kernels.attention import KERNEL

    monkeypatch.setattr(KERNEL, "_lib", None)
    monkeypatch.setattr(KERNEL, "_tried", True)
    for weights in ("bf16", "fp32"):
        assert_alone_equals_busy_batch(build(weights))


def test_seeded_sampling_alone_equals_batched(bf16_model):
    engine = Engine(bf16_model, max_batch=6)
    sampled = [Request(prompt(5 + i, seed=i), SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95,
                                                          top_k=50, seed=100 + i, stop_token_ids=[]))
               for i in range(3)]
    others = [Request(prompt(9, seed=7), greedy(12)),
              Request(prompt(4, seed=8), SamplingParams(max_new_tokens=12, temperature=1.2, stop_token_ids=[]))]
    alone = [tokens(run_alone(engine, r)) for r in sampled]
    together = drive(engine, {0: sampled[:2] + others, 2: sampled[2:]})
    assert [tokens(s) for s in together[:2] + together[4:]] == alone
    unseeded = Request(sampled[0].prompt_ids, SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95,
                                                             top_k=50, seed=101, stop_token_ids=[]))
    assert tokens(run_alone(engine, unseeded)) != alone[0]  # the seed matters


# int8 keeps the greedy tokens of this random model; int4 may flip a near tie (top logprobs
# here are about -5.7 over a 2k vocabulary), so it is held to the top logprob only
@pytest.mark.parametrize("kind,close", [("int8", 0.05), ("int4", 0.5)])
def test_coded_kv_cache_slots(bf16_model, kind, close):
    engine = Engine(bf16_model, max_batch=4, kv_dtype=kind)
    requests = [Request(prompt(4 + 5 * i, seed=20 + i), greedy(8), logprobs=1) for i in range(4)]
    alone = [run_alone(engine, r) for r in requests]
    together = [list(s) for s in drive(engine, {0: requests[:2], 3: requests[2:]})]
    assert [[e.logprob for e in s] for s in together] == [[e.logprob for e in s] for s in alone]
    plain = [run_alone(Engine(bf16_model, max_batch=1), r) for r in requests]
    for coded, exact in zip(alone, plain):  # rounded keys/values: close to the exact cache's step
        assert kind == "int4" or coded[0].token_id == exact[0].token_id
        for step in (0, 1):
            assert coded[step].logprob.top[0][1] == pytest.approx(exact[step].logprob.top[0][1], abs=close)


# ---------------------------------------------------------------- scheduling

def test_cancel_frees_the_slot_for_a_waiting_request(bf16_model):
    engine = Engine(bf16_model, max_batch=2, max_queue=4)
    a, b, c, d = (engine.submit(Request(prompt(5, seed=i), greedy(50))) for i in range(4))
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 2
    d.cancel()  # still waiting: it leaves the queue
    a.cancel()
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 0
    assert list(a)[-1].finish_reason == "cancelled"
    assert [(e.token_id, e.finish_reason) for e in d] == [(None, "cancelled")] and d.usage["completion_tokens"] == 0
    assert c.usage["completion_tokens"] == 2  # admitted, prefilled and decoded in the same step
    assert b.finish_reason is None


def test_queue_full_and_bad_requests(bf16_model):
    engine = Engine(bf16_model, max_batch=2, max_queue=1)
    for i in range(2):  # the two free slots take them at the next step
        engine.submit(Request(prompt(4, seed=i), greedy(3)))
    with pytest.raises(QueueFull):  # two more would leave two waiting, past max_queue 1
        engine.submit_all([Request(prompt(4, seed=i), greedy(3)) for i in range(2, 4)])
    assert engine.stats()["waiting"] == 2  # all or nothing: the refused pair left nothing behind
    engine.submit(Request(prompt(4, seed=4), greedy(3)))  # one more fits the queue
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt(4, seed=5), greedy(3)))
    with pytest.raises(MiniCPMError, match="can never be served"):  # more than slots + queue
        engine.submit_all([Request(prompt(4, seed=i), greedy(3)) for i in range(4)])
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    with pytest.raises(MiniCPMError, match=f"prompt has {CONTEXT} tokens.*context holds {CONTEXT}"):
        engine.submit(Request(prompt(CONTEXT, seed=0), greedy(3)))
    with pytest.raises(MiniCPMError, match="prompt_logprobs"):
        engine.submit(Request(prompt(4, seed=0), greedy(0)))
    with pytest.raises(MiniCPMError, match="token ids"):
        engine.submit(Request([1, VOCAB], greedy(3)))
    with pytest.raises(MiniCPMError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(MiniCPMError, match="context must be in"):
        Engine(bf16_model, context=CONTEXT + 1)


def test_finish_reasons(bf16_model):
    engine = Engine(bf16_model, max_batch=4)
    p = prompt(10, seed=1)
    free = tokens(run_alone(engine, Request(p, greedy(8))))
    stop_at = free[3]
    first = free.index(stop_at)
    stopped = run_alone(engine, Request(p, greedy(8, stop_token_ids=[stop_at])))
    assert tokens(stopped) == free[:first + 1] and stopped[-1].finish_reason == "stop"
    full = run_alone(Engine(bf16_model, max_batch=1, context=15), Request(p, SamplingParams(stop_token_ids=[])))
    assert tokens(full) == free[:5] and full[-1].finish_reason == "length"  # context full
    assert all(e.finish_reason is None for e in full[:-1])


def test_stop_strings_across_token_boundaries(bf16_model, tokenizer):
    engine = Engine(bf16_model, tokenizer, max_batch=2)
    p = prompt(6, seed=11)
    free = run_alone(engine, Request(p, greedy(24)))
    text = "".join(e.text for e in free)
    ids = tokens(free)
    # a stop string made of the end of one token's text and the start of the next one's
    for k in range(1, len(ids)):
        cut = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        if 2 <= cut <= len(text) - 2 and len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) >= cut + 2:
            stop = text[cut - 2:cut + 2]
            break
    expected = text[:text.index(stop)]
    stopped = run_alone(engine, Request(p, greedy(24, stop=["never-there", stop])))
    shown = "".join(e.text for e in stopped)
    assert shown == expected and stop not in shown
    assert stopped[-1].finish_reason == "stop" and len(stopped) < len(free)
    assert engine.stats()["running"] == 0


# ---------------------------------------------------------------- logprobs and penalties

def assert_top_matches(top: list[tuple[int, float]], logprobs: torch.Tensor, k: int) -> None:
    """The top-k as the reference ranks it, up to near-ties that bf16 noise may swap."""
    assert len(top) == k and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    for (token, lp), best in zip(top, logprobs.topk(k).values.tolist()):
        assert lp == pytest.approx(logprobs[token].item(), abs=0.05) and lp == pytest.approx(best, abs=0.05)


def test_logprobs_are_log_softmax_of_a_plain_forward(model):
    engine = Engine(model, max_batch=2)
    p = prompt(7, seed=4)
    events = run_alone(engine, Request(p, greedy(5, temperature=0.0, presence_penalty=1.0), logprobs=3))
    ids = tokens(events)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([p + ids[:-1]]))[0, len(p) - 1:], dim=-1)
    for event, row in zip(events, expected):
        assert event.logprob.token_id == event.token_id
        assert event.logprob.logprob == pytest.approx(row[event.token_id].item(), abs=0.05)
        assert_top_matches(event.logprob.top, row, 3)


def test_prompt_logprobs_equal_a_full_forward_chunk_by_chunk(model):
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    p = prompt(11, seed=6)
    stream = drive(engine, {0: [Request(p, greedy(0), prompt_logprobs=2)]})[0]
    assert [(e.token_id, e.finish_reason) for e in stream] == [(None, "length")]
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([p]))[0], dim=-1)
    got = stream.prompt_logprobs
    assert len(got) == len(p) and got[0] is None
    for i, entry in enumerate(got[1:], start=1):
        assert entry.token_id == p[i]
        assert entry.logprob == pytest.approx(expected[i - 1, p[i]].item(), abs=0.05)
        assert_top_matches(entry.top, expected[i - 1], 2)
    assert stream.usage == {"prompt_tokens": 11, "completion_tokens": 0}


def test_presence_and_frequency_penalties_follow_the_openai_rule():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    assert torch.equal(apply_presence_frequency(logits, counts, 0.5, 0.25),
                       torch.tensor([[1.0, 3.0 - 0.5 - 0.5, 2.0 - 0.5 - 0.25, 0.5]]))
    params = SamplingParams(frequency_penalty=1.5)
    assert sample_next(logits, params, None, counts=counts).item() == 0  # 1.0 beats 0.0 and 0.5
    # the engine applies them over generated tokens: a greedy run by hand with the same rule
    # (fp32, so that full forwards and cached decoding pick the same tokens)
    model = build("fp32")
    engine = Engine(model, max_batch=2)
    p = prompt(5, seed=2)
    got = tokens(run_alone(engine, Request(p, greedy(12, presence_penalty=1.0, frequency_penalty=0.7))))
    seq, counts = list(p), torch.zeros(1, VOCAB)
    with torch.inference_mode():
        for _ in range(12):
            raw = model(torch.tensor([seq]))[:, -1]
            token = int(apply_presence_frequency(raw, counts, 1.0, 0.7).argmax())
            counts[0, token] += 1
            seq.append(token)
    assert got == seq[len(p):]
    assert got != tokens(run_alone(engine, Request(p, greedy(12))))
    assert model.generate(p, max_new_tokens=12, presence_penalty=1.0, frequency_penalty=0.7,
                          stop_token_ids=[]) == got  # generate() applies them too


class OnlyTheseTokens:
    """A stand-in for the JSON-object constraint: allows a few ids, complete after `length`."""

    def __init__(self, allowed: list[int], length: int):
        self.allowed, self.length, self.taken = set(allowed), length, []

    def allows(self, token_id: int) -> bool:
        return token_id in self.allowed

    def advance(self, token_id: int) -> None:
        self.taken.append(token_id)

    @property
    def complete(self) -> bool:
        return len(self.taken) == self.length

    def allowed_mask(self) -> torch.Tensor:
        mask = torch.zeros(VOCAB, dtype=torch.bool)
        mask[list(self.allowed)] = True
        return mask


def test_json_mode_samples_only_what_the_constraint_allows(bf16_model, tokenizer, monkeypatch):
    engine = Engine(bf16_model, tokenizer, max_batch=2)
    p = prompt(6, seed=9)
    free = tokens(run_alone(engine, Request(p, greedy(6))))
    allowed = [free[0], 900, 901, 902]  # the model's first choice, then only unlikely ones
    monkeypatch.setattr(engine, "_json_class", lambda: lambda tokenizer: OnlyTheseTokens(allowed, length=5))
    for params in (greedy(20), SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=[])):
        events = run_alone(engine, Request(p, params, json_object=True))
        assert len(events) == 5 and set(tokens(events)) <= set(allowed)
        assert events[-1].finish_reason == "stop"  # the object is complete
    assert tokens(run_alone(engine, Request(p, greedy(20), json_object=True)))[0] == free[0]


def test_json_mode_keeps_the_reply_a_json_object(bf16_model, tokenizer):
    json_mode = pytest.importorskip("minicpm.generation.json_mode")
    engine = Engine(bf16_model, tokenizer, max_batch=3)
    requests = [Request(prompt(5, seed=40 + i), params, json_object=True)
                for i, params in enumerate((greedy(40), SamplingParams(max_new_tokens=40, temperature=1.0, seed=1),
                                            SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=2)))]
    for stream in drive(engine, {0: requests}):
        events = list(stream)
        text = "".join(e.text for e in events)
        assert json_mode.run(json_mode.START, text) is not None  # a valid beginning of one object
        assert text.lstrip().startswith("{")
        if events[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert events[-1].finish_reason == "length" and len(tokens(events)) == 40


# ---------------------------------------------------------------- the thread

def test_threaded_sync_and_async_consumers(bf16_model):
    requests = [Request(prompt(3 + 4 * i, seed=30 + i), greedy(10)) for i in range(6)]
    with Engine(bf16_model, max_batch=4) as engine:
        sync = [tokens(engine.submit(r)) for r in requests]

        async def consume_all():
            async def consume(stream):
                return [e async for e in stream]
            return await asyncio.gather(*(consume(engine.submit(r)) for r in requests))

        concurrent = asyncio.run(consume_all())
        assert [tokens(events) for events in concurrent] == sync
        assert all(events[-1].finish_reason == "length" for events in concurrent)
        stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["generated_tokens"] == 120


def test_an_async_consumer_that_goes_away_cancels_its_request(bf16_model):
    with Engine(bf16_model, max_batch=2) as engine:
        closed, timed_out = (engine.submit(Request(prompt(4, seed=i), SamplingParams(stop_token_ids=[])))
                             for i in range(2))

        async def leave_early():
            events = closed.__aiter__()
            assert (await events.__anext__()).finish_reason is None
            await events.aclose()  # as `async for ...: break` does once the iterator is finalised

            async def read_all():
                return [event async for event in timed_out]
            with contextlib.suppress(asyncio.TimeoutError):  # as a disconnected client's task
                await asyncio.wait_for(read_all(), timeout=0.001)

        asyncio.run(leave_early())
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closed.finish_reason == timed_out.finish_reason == "cancelled"
        assert engine.stats()["running"] == 0


def test_close_ends_every_stream(bf16_model):
    engine = Engine(bf16_model, max_batch=1).start()
    running = engine.submit(Request(prompt(4, seed=1), SamplingParams(stop_token_ids=[])))
    waiting = engine.submit(Request(prompt(4, seed=2), greedy(5)))
    next(iter(running))
    engine.close()
    assert list(running)[-1].finish_reason == "error" and list(waiting)[-1].finish_reason == "error"
    with pytest.raises(EngineClosed):
        engine.submit(Request(prompt(4, seed=3), greedy(5)))
