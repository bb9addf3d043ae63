"""What the HTTP routes share, and their side of the engine: checks, submitting, gathering.

`ServerState` holds the continuous-batching `Engine` (engine.py), the tokenizer, the served model
name, the API key and the metrics. It checks a request (key, model name, context length),
submits its choices to the engine all or none, and gathers finished choices for a
non-streaming answer while watching for the client to go away: then the streams are cancelled,
so their KV-cache slots are free at the next decode step.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import Request as HttpRequest

from minicpm.errors import MiniCPMError
from minicpm.serving.api_errors import ApiError, ClientGone
from minicpm.serving.engine import Engine, EngineClosed, QueueFull, Request, Stream
from minicpm.serving.images import ImageLimits
from minicpm.serving.metrics import Metrics

RETRY_AFTER_S = 1  # what a client is told to wait when the queue is full
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class Choice:
    """What one engine stream produced, gathered for a non-streaming answer."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token
    finish_reason: str | None = None


class ServerState:
    """The state the routes share: engine, tokenizer, served name, metrics."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
                 image_limits: ImageLimits | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.image_limits = image_limits or ImageLimits()
        self.context = engine.context
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ------------------------------------------------------------------ checks

    def check_key(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            shown = name if len(name) <= 80 else name[:77] + "..."  # echo a bounded part of it
            raise ApiError(404, f"The model '{shown}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, where: str) -> None:
        wanted = prompt_tokens + max(max_tokens or 0, 1)
        if wanted > self.context:
            asked = f" and max_tokens asks for {max_tokens}" if max_tokens else " and at least 1 token must be generated"
            takes = "take" if where == "messages" else "takes"  # "the messages take", "the prompt takes"
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the {where} "
                                f"{takes} {prompt_tokens} tokens{asked} ({wanted} in all). Shorten the {where} "
                                f"or lower max_tokens.", param="messages" if where == "messages" else "prompt",
                           code="context_length_exceeded")

    # ------------------------------------------------------------------ engine

    def submit(self, requests: list[Request]) -> list[Stream]:
        """Submit all choices of one HTTP request, or none of them."""
        try:
            return self.engine.submit_all(requests)
        except QueueFull as exc:
            raise ApiError(429, f"The server is busy: {exc}. Retry later.", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosed:
            raise ApiError(503, "The server is shutting down.", kind="server_error") from None
        except MiniCPMError as exc:
            raise ApiError(400, str(exc)) from None

    async def gather(self, request: HttpRequest, streams: list[Stream], endpoint: str) -> list[Choice]:
        """Every choice in full, unless the client disconnects first (then all are cancelled)."""
        work = asyncio.ensure_future(asyncio.gather(*(collect(s) for s in streams)))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    raise ClientGone
        finally:
            if not work.done():
                work.cancel()
                self.abandon(streams)
        choices = work.result()
        for stream in streams:
            self.metrics.observe_stream(endpoint, stream)
        failed = [s.error for s in streams if s.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"Generation failed: {failed[0]}", kind="server_error")
        return choices

    def abandon(self, streams: list[Stream]) -> None:
        """The client went away: cancel what still runs (its slots free at the next step)."""
        # called once per HTTP request; streams that ended normally were counted as they ended
        gone = [s for s in streams if s.finish_reason in (None, "cancelled")]
        cancel_all(gone)
        if gone:
            self.metrics.finished.labels("cancelled").inc(len(gone))


def cancel_all(streams: list[Stream]) -> None:
    for stream in streams:
        stream.cancel()


async def collect(stream: Stream) -> Choice:
    choice = Choice()
    async for event in stream:
        choice.text += event.text
        if event.token_id is not None:
            choice.tokens.append(event.token_id)
        if event.logprob is not None:
            choice.logprobs.append(event.logprob)
        choice.finish_reason = event.finish_reason
    return choice
