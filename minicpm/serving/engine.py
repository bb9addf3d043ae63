"""Continuous batching: many requests share one model, one decode step at a time.

`Engine.submit` queues a request and returns its `Stream` of `TokenEvent`s. A background thread
runs the scheduler; each iteration it
  1. ends cancelled requests and admits waiting ones into free KV-cache slots (FIFO);
  2. prefills admitted prompts a chunk (`prefill_chunk` tokens) at a time, until this
     iteration's prompt budget (also `prefill_chunk` tokens) is spent: a long prompt takes
     several iterations, and the streams already running get a token in each of them. A prompt
     with images (a MiniCPM-V model) first runs the vision tower, one batch of same-size slices
     per iteration, each taking the iteration's whole budget; its chunks then run from input
     embeddings with the image features merged in. Decoding is the language model's alone;
  3. runs one decode step for every row with a token to feed (`model.decode_slots`), samples
     each row with its own parameters and random generator, and hands out the events.
A prompt is always cut into the same chunks, and a decode row's result does not depend on the
other rows (see `KVCache.attend_rows`), so a request's greedy tokens are the same alone or in a
busy batch. The engine works on token ids: callers template and tokenize; the tokenizer only
turns new tokens into text (stop strings, `TokenEvent.text`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from minicpm.errors import MiniCPMError
from minicpm.generation.prompts import common_prefix
from minicpm.generation.sampling import (
    Sampler,
    SamplingParams,
    TokenLogprob,
    check_vocabulary,
    prompt_logprobs,
    token_logprob,
)
from minicpm.generation.text import RowText, with_chat_stop_ids
from minicpm.vision.model import MiniCPMV
from minicpm.vision.request import ImagePrompt

__all__ = ["Engine", "EngineClosed", "QueueFull", "Request", "Stream", "TokenEvent", "TokenLogprob"]

log = logging.getLogger(__name__)
JSON_RETRIES = 8  # resamples of a token the JSON constraint refuses, before masking the whole vocabulary


class QueueFull(RuntimeError):
    """More requests would wait than the engine's max_queue (the server answers 429)."""


class EngineClosed(RuntimeError):
    """The engine was closed; it takes no more requests."""


@dataclass
class Request:
    prompt_ids: list[int]  # already templated and tokenized
    params: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None  # k: the chosen token's logprob and the top-k per new token
    prompt_logprobs: int | None = None  # k: the same for every prompt token (the first: None)
    json_object: bool = False  # constrain the reply to one JSON object
    images: ImagePrompt | None = None  # a MiniCPM-V prompt's images; prompt_ids are its ids


@dataclass
class TokenEvent:
    token_id: int | None  # None only on a final event that carries no token
    text: str  # text this token released (stop strings held back and never shown); may be ""
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error"


class Stream:
    """The events of one request, for a sync (`for`) or an async (`async for`) consumer.

    The engine thread appends events; a waiting consumer is woken through a condition variable
    (sync) or its event loop (async), so no thread is parked per async stream.
    """

    def __init__(self, request: Request, engine: Engine):
        self.request = request
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": 0}
        self.metrics: dict[str, float] = {}
        self.finish_reason: str | None = None
        self.error: str | None = None  # why, when finish_reason is "error"
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._engine = engine
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._ready = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._drained = False  # the final event was taken: iterating again ends at once

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next engine step, then iteration ends."""
        self.cancelled = True
        self._engine._wake_up()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._ready:
                while not self._events and not self._drained:
                    self._ready.wait()
                event = self._take()
            if event is None:
                return
            yield event

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        """As `__iter__`; a consumer that goes away (its task cancelled, as when a client
        disconnects, or the iterator closed early) cancels the request."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._ready:
                    waiting = not self._events and not self._drained
                    if waiting:
                        woken = loop.create_future()
                        self._waiter = (loop, woken)
                    else:
                        event = self._take()
                if waiting:
                    await woken
                elif event is None:
                    return
                else:
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            if not self._drained:
                self.cancel()
            raise

    def _take(self) -> TokenEvent | None:
        """The next event (lock held); None once the final one has been taken."""
        if self._drained:
            return None
        event = self._events.popleft()
        self._drained = event.finish_reason is not None
        return event

    def _push(self, event: TokenEvent) -> None:
        """Called by the engine thread."""
        with self._ready:
            self._events.append(event)
            self._ready.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, woken = waiter
            try:
                loop.call_soon_threadsafe(_resolve, woken)
            except RuntimeError:  # the consumer's event loop is closed: nobody to wake
                pass

    def _seconds(self) -> float:
        return time.perf_counter() - self.submitted


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # the consumer may have gone (a client that disconnected)
        future.set_result(None)


class _Row:
    """A request admitted into a KV-cache slot: its prefill progress and decoding state."""

    def __init__(self, stream: Stream, slot: int, engine: Engine, reused: int = 0):
        request = stream.request
        self.stream, self.request, self.slot = stream, request, slot
        self.prompt = request.prompt_ids
        self.prefilled = reused  # prompt tokens already in the slot (a previous request's prefix)
        self.position = reused  # tokens in the slot: where the next token is written
        self.next_token: int | None = None  # sampled, shown, not yet fed to the model
        self.generated = 0
        params = request.params
        room = engine.context - len(self.prompt)
        self.budget = room if params.max_new_tokens is None else min(params.max_new_tokens, room)
        self.stop_ids = engine._stop_ids(params)
        self.sampler = Sampler(params, engine.vocab_size, [self.prompt])
        self.text = RowText(engine.tokenizer, params.stop) if engine.tokenizer is not None else None
        self.constraint = engine._json_constraint() if request.json_object else None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def plain_greedy(self) -> bool:
        return self.sampler.plain_greedy and self.constraint is None


class Engine:
    """Continuous batching over one model: `submit` requests, iterate their streams.

    max_batch: KV-cache slots, the rows decoded together. The native decode Linear kernels
    (bf16, fp32, int4/int8) keep a row's result independent of the others up to 16 rows; past
    that, float weights go to oneDNN/MKL (MKL's fp32 sums change with the row count).
    max_queue: waiting requests before QueueFull. prefill_chunk: prompt tokens per forward call,
    and per scheduler iteration. kv_dtype: "int8" halves the cache. context: positions per slot
    (default: max_position_embeddings; the cache is allocated lazily, pages as they are written).
    prefix_cache: a free slot keeps the prompt its last request prefilled, and a new request
    whose prompt starts the same (a chat's next turn, re-sent whole by the client) takes that
    slot and prefills only from there (see `_pick_slot`); no memory beyond the slots.
    A MiniCPMV model serves requests with images; the engine decodes with its language model.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256, kv_dtype: str | None = None, context: int | None = None,
                 prefix_cache: bool = True):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise MiniCPMError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.vision = model if isinstance(model, MiniCPMV) else None
        self.model, self.tokenizer = (model.llm if self.vision is not None else model), tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.context = context or self.model.config.max_position_embeddings
        if not 2 <= self.context <= self.model.config.max_position_embeddings:
            # past it, dynamic NTK rope would rescale by the longest row: rows would depend on each other
            raise MiniCPMError(f"context must be in [2, {self.model.config.max_position_embeddings}], "
                               f"got {self.context}")
        self.vocab_size = self.model.config.vocab_size
        self.cache = self.model.new_cache(max_batch, self.context, kv_dtype)
        # a reused prefix is whole prefill chunks, ending where the cache can resume writing
        self._reuse_step = math.lcm(prefill_chunk, self.cache.ALIGN)
        self._threads = torch.get_num_threads()  # a new thread would start from the default
        self._lock = threading.Condition()
        self._waiting: collections.deque[Stream] = collections.deque()
        self._rows: list[_Row] = []  # admitted, in admission order (engine thread only)
        self._free = list(range(max_batch))  # least recently released first
        self.prefix_cache = prefix_cache
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # prompt ids a slot's cache holds
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counters = {"steps": 0, "generated_tokens": 0, "prompt_tokens": 0, "images": 0, "image_slices": 0,
                         "prefix_cache_hits": 0, "prefix_cache_tokens": 0}

    # ---------------------------------------------------------------- public API

    def start(self) -> Engine:
        if self._thread is None:
            _release_openmp_workers()
            self._thread = threading.Thread(target=self._run, name="minicpm-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: Request) -> Stream:
        """Queue a request; raises QueueFull, EngineClosed, or MiniCPMError for a bad request."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Stream]:
        """Queue several requests (the choices of one HTTP request) all together, or none of them.

        They are accepted when, once the free slots have taken what waits, at most `max_queue`
        would still wait; more than `max_batch + max_queue` at once can never be accepted, which
        is an error of the request (MiniCPMError), not a busy server (QueueFull).
        """
        if len(requests) > self.max_batch + self.max_queue:
            raise MiniCPMError(f"{len(requests)} sequences in one request can never be served: this server "
                               f"runs {self.max_batch} at once and queues {self.max_queue}")
        for request in requests:
            self._validate(request)
        streams = [Stream(request, self) for request in requests]
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) + len(streams) > self.max_queue + len(self._free):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for {len(self._free)} free "
                                f"slots (max_queue {self.max_queue})")
            self._waiting.extend(streams)
            self._lock.notify()
        return streams

    def close(self) -> None:
        """Stop the scheduler; every unfinished stream ends with finish_reason "error"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for row in list(self._rows):
            self._finish(row, None, "", None, "error", "the engine was closed")
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for stream in waiting:
            _end(stream, "error", "the engine was closed")

    def stats(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._waiting)
        return {"running": len(self._rows), "waiting": waiting, "max_batch": self.max_batch,
                "max_queue": self.max_queue, **self.counters}

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- checks on submit

    def _validate(self, request: Request) -> None:
        prompt, params = request.prompt_ids, request.params
        if not prompt:
            raise MiniCPMError("the prompt has no tokens")
        if request.images is not None:
            if self.vision is None:
                raise MiniCPMError("this is a text-only model: it cannot read images")
            if request.images.ids != prompt:
                raise MiniCPMError("a request with images must have its image prompt's ids as prompt_ids")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise MiniCPMError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt) + 1 > self.context:
            raise MiniCPMError(f"the prompt has {len(prompt)} tokens but the context holds {self.context} "
                               f"(prompt + 1 generated token must fit)")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not (isinstance(k, int) and 0 <= k <= self.vocab_size):
                raise MiniCPMError(f"{name} must be an integer in [0, {self.vocab_size}], got {k!r}")
        check_vocabulary(params, self.vocab_size)
        if params.max_new_tokens == 0 and request.prompt_logprobs is None:
            raise MiniCPMError("max_new_tokens 0 only scores the prompt: ask for prompt_logprobs")
        if params.stop and self.tokenizer is None:
            raise MiniCPMError("stop strings need the engine to have a tokenizer")
        if request.json_object:
            self._json_class()  # raises if JSON mode is not available

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        if self.tokenizer is not None:
            params = with_chat_stop_ids(self.model, self.tokenizer, params)
        ids = self.model.config.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids
        return set(ids)

    def _json_class(self) -> type:
        if self.tokenizer is None:
            raise MiniCPMError("JSON mode needs the engine to have a tokenizer")
        try:
            from minicpm.generation.json_mode import JsonObjectConstraint
        except ImportError:
            raise MiniCPMError("JSON mode is not available in this build") from None
        return JsonObjectConstraint

    def _json_constraint(self):
        """A fresh JSON-object constraint (its per-tokenizer tables are built once)."""
        return self._json_class()(self.tokenizer)

    # ---------------------------------------------------------------- the scheduler thread

    def _wake_up(self) -> None:
        with self._lock:
            self._lock.notify()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closed and not self._rows and not self._waiting:
                        self._lock.wait()
                    if self._closed:
                        return
                try:
                    self.step()
                except Exception as exc:  # a bug or a broken model: fail the rows, keep serving
                    log.exception("engine step failed")
                    for row in list(self._rows):
                        self._finish(row, None, "", None, "error", f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        """One scheduler iteration (the thread calls this; tests may too, without start())."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        self.counters["steps"] += 1

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows if r.stream.cancelled]:
            self._finish(row, None, "", None, "cancelled")
        with self._lock:
            cancelled = [s for s in self._waiting if s.cancelled]
            for stream in cancelled:
                self._waiting.remove(stream)
        for stream in cancelled:
            _end(stream, "cancelled")

    def _admit(self) -> None:
        with self._lock:  # slots are taken under the lock: submit_all counts the free ones
            admitted = []
            for _ in range(min(len(self._free), len(self._waiting))):
                stream = self._waiting.popleft()
                admitted.append((stream, *self._pick_slot(stream.request)))
        for stream, slot, reused in admitted:
            stream.metrics["queued_s"] = stream._seconds()
            self._held[slot] = self._held[slot][:reused]  # the rest is overwritten from here
            if reused:
                self.counters["prefix_cache_hits"] += 1
                self.counters["prefix_cache_tokens"] += reused
            try:
                self._rows.append(_Row(stream, slot, self, reused))
            except Exception as exc:  # e.g. the JSON constraint could not be built
                log.exception("admitting a request failed")
                self._release(slot)
                _end(stream, "error", f"{type(exc).__name__}: {exc}")

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def _pick_slot(self, request: Request) -> tuple[int, int]:
        """A free slot for `request` (lock held) and how many of its prompt tokens the slot holds
        already: the free slot whose held prompt shares the most with it, else the one released
        longest ago (so recent conversations stay for their next turn: LRU eviction).

        Only prefill-written positions are held (a reply's positions were written by decode
        steps, whose sums differ from a prefill's in the last bits), only whole chunks are reused
        (the rest is prefilled in the same chunks as without the cache, so with the same sums;
        an int4 cache's key blocks as well),
        and never for images (same placeholder ids, other pictures) or prompt logprobs: a reply
        is token for token and logprob for logprob what a cache-less engine gives."""
        slot, reused = self._free[0], 0
        if self.prefix_cache and request.images is None and request.prompt_logprobs is None:
            for candidate in self._free:
                common = common_prefix(self._held[candidate], request.prompt_ids[:-1])  # the last one runs
                common -= common % self._reuse_step
                if common > reused:
                    slot, reused = candidate, common
        self._free.remove(slot)
        return slot, reused

    # ---------------------------------------------------------------- prefill

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for row in [r for r in self._rows if r.prefilling]:
            if budget <= 0:
                break
            budget -= self._prefill_chunk(row)

    def _prefill_chunk(self, row: _Row) -> int:
        """Run the row's next prompt chunk (or batch of image slices: the whole budget); at the
        prompt's end, emit its first token."""
        images = row.request.images
        if images is not None and not images.encoded:
            self.counters["image_slices"] += images.encode_step(self.vision)
            if images.encoded:
                self.counters["images"] += images.images
            return self.prefill_chunk
        start = row.prefilled
        end = min(start + self.prefill_chunk, len(row.prompt))
        wants_prompt_logprobs = row.request.prompt_logprobs is not None
        ids = torch.tensor(row.prompt[start:end], dtype=torch.long)
        embeds = None if images is None else images.embeddings(self.vision)[start:end]
        logits = self.model.prefill_slot(ids, self.cache, row.slot, start, last_only=not wants_prompt_logprobs,
                                         inputs_embeds=embeds)
        if wants_prompt_logprobs:
            if start == 0:
                row.stream.prompt_logprobs.append(None)  # nothing precedes the first token
            targets = row.prompt[start + 1:end + 1]  # each position predicts the next prompt token
            row.stream.prompt_logprobs.extend(prompt_logprobs(logits, targets, row.request.prompt_logprobs))
        row.prefilled = row.position = end
        self._held[row.slot] = row.prompt[:end] if images is None else []
        self.counters["prompt_tokens"] += end - start
        if not row.prefilling:
            if row.budget == 0:  # scoring only (max_new_tokens 0)
                self._finish(row, None, "", None, "length")
            else:
                self._accept(row, self._sample(row, logits[-1]), logits[-1])
        return end - start

    # ---------------------------------------------------------------- decode

    def _decode(self) -> None:
        rows = [r for r in self._rows if r.next_token is not None]
        if not rows:
            return
        ids = torch.tensor([r.next_token for r in rows], dtype=torch.long)
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long)
        positions = torch.tensor([r.position for r in rows], dtype=torch.long)
        logits = self.model.decode_slots(ids, self.cache, slots, positions)
        if all(r.plain_greedy for r in rows):
            tokens = logits.argmax(-1).tolist()  # one call for the common case
        else:
            tokens = [self._sample(r, logits[i]) for i, r in enumerate(rows)]
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.position += 1
            self._accept(row, token, logits[i])

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        if row.constraint is None:
            return _sample_one(row.sampler, logits)
        return self._sample_json(row, logits)

    def _sample_json(self, row: _Row, logits: torch.Tensor) -> int:
        """Sample; while the JSON constraint refuses the token, rule it out and sample again
        (cheap when the model mostly follows), then fall back to the full allowed mask."""
        logits = logits.clone()
        for _ in range(JSON_RETRIES):
            token = _sample_one(row.sampler, logits)
            if row.constraint.allows(token):
                return token
            logits[token] = float("-inf")
        allowed = torch.zeros_like(logits, dtype=torch.bool)  # ids past the tokenizer's: never
        known = row.constraint.allowed_mask()[:len(logits)]
        allowed[:len(known)] = known
        return _sample_one(row.sampler, logits.masked_fill(~allowed, float("-inf")))

    def _accept(self, row: _Row, token: int, logits: torch.Tensor) -> None:
        """A sampled token: count it, turn it into text, finish the row or queue it for decoding."""
        stream = row.stream
        row.generated += 1
        stream.usage["completion_tokens"] = row.generated
        self.counters["generated_tokens"] += 1
        if row.generated == 1:
            stream.metrics["ttft_s"] = stream._seconds()
        logprob = None if row.request.logprobs is None else token_logprob(logits, token, row.request.logprobs)
        row.sampler.observe([token])
        if token in row.stop_ids:  # not part of the reply: no logprob for it either
            self._finish(row, token, self._flush(row), None, "stop")
            return
        text = row.text.push(token) if row.text is not None else ""
        if row.constraint is not None:
            row.constraint.advance(token)
        if row.text is not None and row.text.stopped:  # the token that completed a stop string
            self._finish(row, token, text + self._flush(row), None, "stop")
        elif row.constraint is not None and row.constraint.complete:
            self._finish(row, token, text + self._flush(row), logprob, "stop")
        elif row.generated >= row.budget:
            self._finish(row, token, text + self._flush(row), logprob, "length")
        else:
            row.next_token = token
            stream._push(TokenEvent(token, text, logprob, None))

    @staticmethod
    def _flush(row: _Row) -> str:
        return row.text.flush() if row.text is not None else ""

    def _finish(self, row: _Row, token: int | None, text: str, logprob: TokenLogprob | None,
                reason: str, error: str | None = None) -> None:
        """End a row now and give its slot back."""
        self._rows.remove(row)
        self._release(row.slot)
        row.next_token = None
        row.stream.error = error
        _end(row.stream, reason, error, TokenEvent(token, text, logprob, reason))


def _release_openmp_workers() -> None:
    """Let the calling thread's idle OpenMP workers exit before the engine thread makes its own.

    Each thread that runs parallel code gets its own OpenMP team. While the loading thread's
    idle workers live, libgomp counts more threads than cores and makes every worker sleep
    instead of spin between parallel regions: measured, each short decode kernel then costs
    ~150 instead of ~60 us, and SmolLM2's decode step took twice as long in the engine thread.
    """
    try:
        ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(1)  # omp_pause_soft (OpenMP 5.0)
    except (OSError, AttributeError):
        pass  # another OpenMP runtime: nothing to release, or nothing we know how to


def _end(stream: Stream, reason: str, error: str | None = None, event: TokenEvent | None = None) -> None:
    stream.finish_reason = reason
    stream.error = error
    stream.metrics["total_s"] = stream._seconds()
    stream._push(event or TokenEvent(None, "", None, reason))


def _sample_one(sampler: Sampler, logits: torch.Tensor) -> int:
    """A one-row sampler's next token from fp32 logits [V]."""
    return int(sampler.sample(logits[None])[0])
