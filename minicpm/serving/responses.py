"""OpenAI's answer shapes: response bodies, stream chunks as Server-Sent Events, logprobs.

Chat completions and the legacy completions each have a full body and a chunk stream; their
logprobs differ too: chat gives a list of {token, logprob, bytes, top_logprobs}, completions
give parallel lists (tokens, token_logprobs, top_logprobs, text_offset) and, with echo, score
the prompt as well. Only "stop" and "length" are shown as finish reasons. A stream ends with
`data: [DONE]`; leaving it early (the client went away) cancels the engine streams behind it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from minicpm.serving.api_errors import error_body
from minicpm.serving.engine import Stream, TokenEvent
from minicpm.serving.protocol import ChatCompletionRequest, CompletionRequest
from minicpm.serving.state import Choice, ServerState, cancel_all


@dataclass
class PromptInput:
    """One completions prompt, as text and as token ids."""

    text: str  # what echo shows
    ids: list[int]


def usage(streams: list[Stream], prompt_tokens: int | None = None) -> dict[str, int]:
    prompt = sum({id(s.request.prompt_ids): s.usage["prompt_tokens"] for s in streams}.values()) \
        if prompt_tokens is None else prompt_tokens
    completion = sum(s.usage["completion_tokens"] for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def public_reason(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


# ---------------------------------------------------------------------- streaming plumbing


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from several streams as they arrive; leaving early cancels them."""
    queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        async for event in stream:
            await queue.put((index, event))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    running = len(streams)
    try:
        while running:
            index, event = await queue.get()
            running -= event.finish_reason is not None
            yield index, event
    finally:
        for task in pumps:
            task.cancel()
        cancel_all([s for s in streams if s.finish_reason is None])


def event_stream(server: ServerState, chunks: AsyncIterator[str], streams: list[Stream]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for text in chunks:
                yield text
        finally:  # the client went away (the response task was cancelled) or we are done
            server.abandon(streams)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------- logprob formats


def chat_logprob(server: ServerState, lp) -> dict[str, Any]:
    """The chat API's entry for one generated token (a TokenLogprob)."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = server.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


@dataclass
class _Scored:
    """A token with an optional logprob, in the shape `legacy_logprobs` reads."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]

    @property
    def has_logprob(self) -> bool:
        return self.logprob is not None


def legacy_logprobs(server: ServerState, entries: list, start_offset: int) -> dict[str, list]:
    """The completions API's logprobs object for a run of tokens (`_Scored`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    decoder = server.tokenizer.stream_decoder(skip_special_tokens=False)
    offset = start_offset
    for lp in entries:
        out["tokens"].append(server.token_text(lp.token_id))
        out["token_logprobs"].append(lp.logprob if lp.has_logprob else None)
        out["top_logprobs"].append(legacy_top(server, lp) if lp.has_logprob else None)
        out["text_offset"].append(offset)
        offset += len(decoder.push(lp.token_id))
    return out


def legacy_top(server: ServerState, lp: _Scored) -> dict[str, float]:
    """The k most likely tokens and, as OpenAI does, the chosen one too (k + 1 entries at most)."""
    top = {server.token_text(t): v for t, v in lp.top}
    if all(t != lp.token_id for t, _ in lp.top):
        top[server.token_text(lp.token_id)] = lp.logprob
    return top


def completion_logprobs(server: ServerState, stream: Stream, choice: Choice, prompt: PromptInput,
                        echo: str) -> dict[str, list]:
    """A whole choice's logprobs; with echo its prompt tokens come first (None where unscored)."""
    entries: list[_Scored] = []
    if echo:
        for token_id, lp in zip(prompt.ids, stream.prompt_logprobs or [None] * len(prompt.ids)):
            entries.append(_Scored(token_id, None, []) if lp is None else _Scored(token_id, lp.logprob, lp.top))
    entries += [_Scored(lp.token_id, lp.logprob, lp.top) for lp in choice.logprobs]
    return legacy_logprobs(server, entries, 0)


# ---------------------------------------------------------------------- chat completions


def chat_completion_body(server: ServerState, body: ChatCompletionRequest, choices: list[Choice],
                         streams: list[Stream], prompt_tokens: int, reply_id: str, created: int) -> dict[str, Any]:
    return {
        "id": reply_id, "object": "chat.completion", "created": created, "model": server.model_name,
        "choices": [{
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": {"content": [chat_logprob(server, lp) for lp in c.logprobs]} if body.logprobs else None,
            "finish_reason": public_reason(c.finish_reason),
        } for i, c in enumerate(choices)],
        "usage": usage(streams, prompt_tokens),
    }


async def chat_chunks(server: ServerState, body: ChatCompletionRequest, streams: list[Stream], reply_id: str,
                      created: int) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage_: dict | None = None) -> str:
        payload = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                   "model": server.model_name, "choices": choices}
        if body.include_usage:
            payload["usage"] = usage_
        return sse(payload)

    for i in range(body.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for i, event in merged(streams):
        if event.finish_reason == "error":
            yield sse(error_body(f"Generation failed: {streams[i].error}", "server_error"))
            continue
        logprobs = {"content": [chat_logprob(server, event.logprob)]} if event.logprob is not None else None
        if event.text or logprobs:
            yield chunk([{"index": i, "delta": {"content": event.text}, "logprobs": logprobs,
                          "finish_reason": None}])
        if event.finish_reason is not None:
            server.metrics.observe_stream("chat", streams[i])
            yield chunk([{"index": i, "delta": {}, "logprobs": None,
                          "finish_reason": public_reason(event.finish_reason)}])
    if body.include_usage:
        yield chunk([], usage(streams, len(streams[0].request.prompt_ids)))
    yield sse("[DONE]")


# ---------------------------------------------------------------------- completions


def completion_body(server: ServerState, body: CompletionRequest, choices: list[Choice], streams: list[Stream],
                    prompt_of: list[PromptInput], reply_id: str, created: int) -> dict[str, Any]:
    out = []
    for i, (c, stream, prompt) in enumerate(zip(choices, streams, prompt_of)):
        echo = prompt.text if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(server, stream, c, prompt, echo)
        out.append({"index": i, "text": echo + c.text, "logprobs": logprobs,
                    "finish_reason": public_reason(c.finish_reason)})
    return {"id": reply_id, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": out, "usage": usage(streams)}


async def completion_chunks(server: ServerState, body: CompletionRequest, streams: list[Stream],
                            prompt_of: list[PromptInput], reply_id: str, created: int) -> AsyncIterator[str]:
    def chunk(index: int, text: str, logprobs: dict | None, reason: str | None) -> str:
        payload = {"id": reply_id, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
        if body.include_usage:
            payload["usage"] = None
        return sse(payload)

    if body.echo:
        for i, prompt in enumerate(prompt_of):
            yield chunk(i, prompt.text, None, None)
    offsets = [len(p.text) if body.echo else 0 for p in prompt_of]
    async for i, event in merged(streams):
        if event.finish_reason == "error":
            yield sse(error_body(f"Generation failed: {streams[i].error}", "server_error"))
            continue
        logprobs = None
        if event.logprob is not None:
            lp = event.logprob
            logprobs = legacy_logprobs(server, [_Scored(lp.token_id, lp.logprob, lp.top)], offsets[i])
        offsets[i] += len(event.text)
        if event.text or logprobs or event.finish_reason is not None:
            if event.finish_reason is not None:
                server.metrics.observe_stream("completions", streams[i])
            yield chunk(i, event.text, logprobs, public_reason(event.finish_reason))
    if body.include_usage:
        payload = {"id": reply_id, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": [], "usage": usage(streams)}
        yield sse(payload)
    yield sse("[DONE]")
