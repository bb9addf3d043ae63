"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching engine.

Routes: /v1/models, /v1/chat/completions, /v1/completions (with echo + logprobs, which is how
lm-evaluation-harness scores log-likelihoods), /tokenize, /detokenize, /health, /metrics and the
web chat page at /. Every request becomes one engine `Request` per choice; streaming answers are
Server-Sent Events in OpenAI's chunk format. A client that goes away cancels its requests, so
their KV-cache slots are free at the next decode step.

Errors always use OpenAI's body ({"error": {"message", "type", "param", "code"}}): 400 for a
malformed body or a bad parameter (naming it), 401 for a wrong key, 404 for an unknown model,
429 with Retry-After when the queue is full, 500 when generation fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpm.errors import MiniCPMError
from minicpm.generation.chat import ROLE_MARKERS
from minicpm.serving import protocol
from minicpm.serving.engine import Engine, EngineClosed, QueueFull, Request, Stream, TokenEvent
from minicpm.serving.metrics import CONTENT_TYPE, Metrics
from minicpm.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what a client is told to wait when the queue is full
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code),
                            status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class Choice:
    """What one engine stream produced, gathered for a non-streaming answer."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token
    finish_reason: str | None = None


class Server:
    """The state the routes share: engine, tokenizer, served name, metrics."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
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
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, where: str) -> None:
        wanted = prompt_tokens + max(max_tokens or 0, 1)
        if wanted > self.context:
            asked = f" and max_tokens asks for {max_tokens}" if max_tokens else " and at least 1 token must be generated"
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the {where} "
                                f"take {prompt_tokens} tokens{asked} ({wanted} in all). Shorten the {where} "
                                f"or lower max_tokens.", param="messages" if where == "messages" else "prompt",
                           code="context_length_exceeded")

    # ------------------------------------------------------------------ engine

    def submit(self, requests: list[Request]) -> list[Stream]:
        """Submit all choices of one HTTP request, or none of them."""
        streams: list[Stream] = []
        try:
            for request in requests:
                streams.append(self.engine.submit(request))
        except QueueFull as exc:
            cancel_all(streams)
            raise ApiError(429, f"The server is busy: {exc}. Retry later.", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosed:
            cancel_all(streams)
            raise ApiError(503, "The server is shutting down.", kind="server_error") from None
        except MiniCPMError as exc:
            cancel_all(streams)
            raise ApiError(400, str(exc)) from None
        return streams

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

    def usage(self, streams: list[Stream], prompt_tokens: int | None = None) -> dict[str, int]:
        prompt = sum({id(s.request.prompt_ids): s.usage["prompt_tokens"] for s in streams}.values()) \
            if prompt_tokens is None else prompt_tokens
        completion = sum(s.usage["completion_tokens"] for s in streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ------------------------------------------------------------------ logprob formats

    def chat_logprob(self, lp) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def legacy_logprobs(self, entries: list, start_offset: int, text_before: str = "") -> dict[str, list]:
        """The completions API's logprobs object for a run of tokens (TokenLogprob or None)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=False)
        offset = start_offset
        for lp in entries:
            out["tokens"].append(self.token_text(lp.token_id))
            out["token_logprobs"].append(lp.logprob if lp.has_logprob else None)
            out["top_logprobs"].append({self.token_text(t): v for t, v in lp.top} if lp.has_logprob else None)
            out["text_offset"].append(offset)
            offset += len(decoder.push(lp.token_id))
        return out


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


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def public_reason(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


# ---------------------------------------------------------------------- the app


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine on startup and closes it on shutdown."""
    server = Server(engine, tokenizer, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="minicpm", summary="OpenAI-compatible API for MiniCPM-family models", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    install_request_counter(app, server.metrics)
    authorised = [Depends(server.check_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def web_chat() -> HTMLResponse:
        return HTMLResponse(chat_page())

    @app.get("/v1/models", dependencies=authorised)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "minicpm", "max_model_len": server.context}]}

    @app.post("/v1/chat/completions", dependencies=authorised)
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        return await chat_completion(server, body, http)

    @app.post("/v1/completions", dependencies=authorised)
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await completion(server, body, http)

    @app.post("/tokenize", dependencies=authorised)
    async def tokenize(body: protocol.TokenizeRequest) -> dict[str, Any]:
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                                add_generation_prompt=body.add_generation_prompt, tokenize=True)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.context}

    @app.post("/detokenize", dependencies=authorised)
    async def detokenize(body: protocol.DetokenizeRequest) -> dict[str, Any]:
        server.check_model(body.model)
        bad = [t for t in body.tokens if t >= tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (size {tokenizer.vocab_size})",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app


@lru_cache(maxsize=1)
def chat_page() -> str:
    page = resources.files("minicpm.serving").joinpath("static/chat.html")
    if not page.is_file():
        return "<!doctype html><title>minicpm</title><p>The web chat page is not installed.</p>"
    return page.read_text(encoding="utf-8")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return bad_body_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(ClientGone)
    async def client_gone(_: HttpRequest, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"

    @app.exception_handler(Exception)
    async def internal_error(_: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"Internal error ({type(exc).__name__}).", kind="server_error").response()


def bad_body_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's first complaint as a 400 that names the parameter."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}.")
    path = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type names to the path (e.g. "prompt.str"); keep the field path.
    param = ".".join(p for p in path if not p[:1].isupper() and p not in _TYPE_NAMES) or None
    where = f"'{param}': " if param else ""
    return ApiError(400, f"Invalid parameter {where}{first['msg']}.", param=param)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "list[str]", "list[int]", "list[list[int]]", "none",
               "constrained-int", "function-after"}


def install_request_counter(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def count(request: HttpRequest, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response


# ---------------------------------------------------------------------- chat completions


async def chat_completion(server: Server, body: ChatCompletionRequest, http: HttpRequest):
    server.check_model(body.model)
    try:
        prompt = server.tokenizer.apply_chat_template(body.message_dicts(), add_generation_prompt=True,
                                                      tokenize=True)
    except MiniCPMError as exc:
        raise ApiError(400, f"The messages cannot be rendered with this model's chat template: {exc}",
                       param="messages") from None
    limit = body.token_limit
    server.check_fits(len(prompt), limit, "messages")
    # MiniCPM's own template marks turns with <AI>/<用户>; a reply never continues past one.
    requests = [Request(prompt, body.sampling_params(limit, i, ROLE_MARKERS), logprobs=body.logprobs_k,
                        json_object=body.json_object) for i in range(body.n)]
    streams = server.submit(requests)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return event_stream(server, chat_chunks(server, body, streams, reply_id, created), streams)
    choices = await server.gather(http, streams, "chat")
    return {
        "id": reply_id, "object": "chat.completion", "created": created, "model": server.model_name,
        "choices": [{
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": {"content": [server.chat_logprob(lp) for lp in c.logprobs]} if body.logprobs else None,
            "finish_reason": public_reason(c.finish_reason),
        } for i, c in enumerate(choices)],
        "usage": server.usage(streams, len(prompt)),
    }


async def chat_chunks(server: Server, body: ChatCompletionRequest, streams: list[Stream], reply_id: str,
                      created: int) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        payload = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                   "model": server.model_name, "choices": choices}
        if body.include_usage:
            payload["usage"] = usage
        return sse(payload)

    for i in range(body.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for i, event in merged(streams):
        if event.finish_reason == "error":
            yield sse(error_body(f"Generation failed: {streams[i].error}", "server_error"))
            continue
        logprobs = {"content": [server.chat_logprob(event.logprob)]} if event.logprob is not None else None
        if event.text or logprobs:
            yield chunk([{"index": i, "delta": {"content": event.text}, "logprobs": logprobs,
                          "finish_reason": None}])
        if event.finish_reason is not None:
            server.metrics.observe_stream("chat", streams[i])
            yield chunk([{"index": i, "delta": {}, "logprobs": None,
                          "finish_reason": public_reason(event.finish_reason)}])
    if body.include_usage:
        yield chunk([], server.usage(streams, len(streams[0].request.prompt_ids)))
    yield sse("[DONE]")


def event_stream(server: Server, chunks: AsyncIterator[str], streams: list[Stream]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for text in chunks:
                yield text
        finally:  # the client went away (the response task was cancelled) or we are done
            server.abandon(streams)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------- completions


@dataclass
class PromptInput:
    text: str  # what echo shows
    ids: list[int]


def completion_prompts(server: Server, body: CompletionRequest) -> list[PromptInput]:
    tokenizer = server.tokenizer
    out = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            out.append(PromptInput(prompt, tokenizer.encode(prompt)))
        else:
            bad = [t for t in prompt if t >= server.engine.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"(size {server.engine.vocab_size})", param="prompt")
            out.append(PromptInput(tokenizer.decode(prompt), list(prompt)))
        if not out[-1].ids:
            raise ApiError(400, "The prompt has no tokens.", param="prompt")
    return out


async def completion(server: Server, body: CompletionRequest, http: HttpRequest):
    server.check_model(body.model)
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 generates nothing: it needs echo (to score the prompt)",
                       param="max_tokens")
    prompts = completion_prompts(server, body)
    for p in prompts:
        server.check_fits(len(p.ids), body.max_tokens, "prompt")
    score_prompt = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    requests = [Request(p.ids, body.sampling_params(body.max_tokens, j), logprobs=body.logprobs,
                        prompt_logprobs=(body.logprobs or 0) if score_prompt else None)
                for p in prompts for j in range(body.n)]
    streams = server.submit(requests)
    reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_of = [p for p in prompts for _ in range(body.n)]
    if body.stream:
        return event_stream(server, completion_chunks(server, body, streams, prompt_of, reply_id, created), streams)
    choices = await server.gather(http, streams, "completions")
    out = []
    for i, (c, stream, prompt) in enumerate(zip(choices, streams, prompt_of)):
        echo = prompt.text if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(server, stream, c, prompt, echo)
        out.append({"index": i, "text": echo + c.text, "logprobs": logprobs,
                    "finish_reason": public_reason(c.finish_reason)})
    return {"id": reply_id, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": out, "usage": server.usage(streams)}


@dataclass
class _Scored:
    """A token with an optional logprob, in the shape `Server.legacy_logprobs` reads."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]

    @property
    def has_logprob(self) -> bool:
        return self.logprob is not None


def completion_logprobs(server: Server, stream: Stream, choice: Choice, prompt: PromptInput,
                        echo: str) -> dict[str, list]:
    entries: list[_Scored] = []
    if echo:
        for token_id, lp in zip(prompt.ids, stream.prompt_logprobs or [None] * len(prompt.ids)):
            entries.append(_Scored(token_id, None, []) if lp is None else _Scored(token_id, lp.logprob, lp.top))
    entries += [_Scored(lp.token_id, lp.logprob, lp.top) for lp in choice.logprobs]
    return server.legacy_logprobs(entries, 0)


async def completion_chunks(server: Server, body: CompletionRequest, streams: list[Stream],
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
            logprobs = server.legacy_logprobs([_Scored(lp.token_id, lp.logprob, lp.top)], offsets[i])
        offsets[i] += len(event.text)
        if event.text or logprobs or event.finish_reason is not None:
            if event.finish_reason is not None:
                server.metrics.observe_stream("completions", streams[i])
            yield chunk(i, event.text, logprobs, public_reason(event.finish_reason))
    if body.include_usage:
        payload = {"id": reply_id, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": [], "usage": server.usage(streams)}
        yield sse(payload)
    yield sse("[DONE]")


# ---------------------------------------------------------------------- running it


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before loading anything else into the event loop, so a taken port is a clear error."""
    if not 0 <= port <= 65535:
        raise MiniCPMError(f"--port must be in [0, 65535] (0 picks a free port), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MiniCPMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "warning") -> None:
    """Serve until Ctrl-C or SIGTERM; the engine is closed on the way out."""
    import uvicorn

    sock = listening_socket(host, port)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{sock.getsockname()[1]}"

    def ready() -> None:
        print(f"minicpm: serving {model_name} at {url}  (OpenAI API: {url}/v1, web chat: {url}/)", flush=True)

    app = create_app(engine, tokenizer, model_name, api_key, on_ready=ready)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
