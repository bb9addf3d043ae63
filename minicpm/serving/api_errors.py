"""The server's errors in OpenAI's shape, and the FastAPI handlers that map exceptions to them.

Every error answer uses OpenAI's body ({"error": {"message", "type", "param", "code"}}): 400 for
a malformed body or a bad parameter (naming it), 401 for a wrong key, 404 for an unknown model
or route, 405 with its Allow header, 429 with Retry-After when the queue is full, 500 when
generation or a route fails.
A client that went away gets 499, which nobody reads.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# pydantic adds the names of Union members to an error's path (e.g. "prompt.str",
# "prompt.list[constrained-int].1", "content.function-after[...]", "content.list[TextPart]")
_PLAIN_TYPES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_member_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _PLAIN_TYPES or "[" in part or "-" in part or part[:1].isupper())


def error_body(message: str, kind: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """An error answer: HTTP status, OpenAI's error fields and extra headers."""

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


def _meant(error: dict[str, Any]) -> int:
    """How surely the value was meant for the type that reported this error: 2 when it had that
    type and broke a constraint, 1 when a number was refused by a number type, 0 otherwise."""
    kind = error.get("type", "")
    if not kind.endswith("_type"):
        return 2
    number = isinstance(error.get("input"), int | float)
    return 1 if number and kind in ("int_type", "float_type", "bool_type") else 0


def _most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report. A value that fits no member of a Union gets one error per member;
    report the member it was meant for: the one with the fewest complaints, then the error where
    the value had the right type (a constraint broke), then the one deepest in the value."""
    def member(error: dict[str, Any]) -> tuple:
        loc = tuple(error.get("loc", ()))
        tags = [i for i, part in enumerate(loc) if _is_member_tag(part)]
        return loc[:tags[0] + 1] if tags else loc

    per_member: dict[tuple, int] = {}
    for error in errors:
        per_member[member(error)] = per_member.get(member(error), 0) + 1
    return min(enumerate(errors), key=lambda e: (per_member[member(e[1])], -_meant(e[1]),
                                                 -len(e[1].get("loc", ())), e[0]))[1]


def bad_body_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's complaint as a 400 that names the parameter (see `_most_telling`)."""
    first = _most_telling(errors) if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}.")
    path = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_member_tag(p)]
    param = ".".join(path) or None
    message = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "missing":
        if param is None:
            return ApiError(400, "The request body is missing: send the parameters as a JSON object.")
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    where = f"parameter '{param}'" if param else "request body"
    return ApiError(400, f"Invalid {where}: {message}.", param=param)


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
        # keep the handler's headers (Allow on a 405, for one)
        return ApiError(exc.status_code, str(exc.detail), kind, headers=exc.headers).response()

    @app.exception_handler(ClientGone)
    async def client_gone(_: HttpRequest, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"

    @app.exception_handler(Exception)
    async def internal_error(_: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"Internal error ({type(exc).__name__}).", kind="server_error").response()


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over `max_bytes` is a 413 before its
    body is read (Starlette reads a whole body into memory). A plain ASGI wrapper, as
    metrics.RequestCounter is, so that a client's disconnect still reaches the route."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                error = ApiError(413, f"The request body is {int(length):,} bytes; this server takes at most "
                                      f"{self.max_bytes:,}.", code="request_too_large")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
