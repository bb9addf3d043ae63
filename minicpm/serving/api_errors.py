"""The server's errors in OpenAI's shape, and the FastAPI handlers that map exceptions to them.

Every error answer uses OpenAI's body ({"error": {"message", "type", "param", "code"}}): 400 for
a malformed body or a bad parameter (naming it), 401 for a wrong key, 404 for an unknown model
or route, 429 with Retry-After when the queue is full, 500 when generation or a route fails.
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

# pydantic adds these names of Union members to an error's path (e.g. "prompt.str")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "list[str]", "list[int]", "list[list[int]]", "none",
               "constrained-int", "function-after"}


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
