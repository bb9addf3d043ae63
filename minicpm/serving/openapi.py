"""The OpenAPI schema at /openapi.json, made to say what the server does.

FastAPI derives the request bodies from protocol.py (with the constraints the server enforces);
`install_openapi` adds what FastAPI cannot see from the routes:
- every error answer is OpenAI's error body (`ErrorResponse`), and a malformed body is a 400, not
  FastAPI's 422 HTTPValidationError (see api_errors);
- 401 on the routes behind the API key (when one is set), 404 where a body names a model,
  429 with Retry-After (and 503 while shutting down) where a request is queued for generation;
- generating routes answer application/json or, with `stream`, text/event-stream; /metrics is
  Prometheus text;
- the shapes of the answers' bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from minicpm.serving.protocol import SamplingFields


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema: these properties (the first ones required); others may be present."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
NULLABLE_STR = {"type": ["string", "null"]}
FINISH_REASON = {"enum": ["stop", "length", None]}
LOGPROBS = {"type": ["object", "null"]}
USAGE = _obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT})

ERROR_BODY = _obj({"error": _obj({"message": STR, "type": STR, "param": NULLABLE_STR, "code": {}})})

# 200 bodies by route path (the routes without an entry keep what FastAPI derived)
ANSWERS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": _obj({
        "id": STR, "object": {"const": "chat.completion"}, "created": INT, "model": STR,
        "choices": {"type": "array", "items": _obj({
            "index": INT, "message": _obj({"role": {"const": "assistant"}, "content": STR}),
            "logprobs": LOGPROBS, "finish_reason": FINISH_REASON})},
        "usage": USAGE}),
    "/v1/completions": _obj({
        "id": STR, "object": {"const": "text_completion"}, "created": INT, "model": STR,
        "choices": {"type": "array", "items": _obj({
            "index": INT, "text": STR, "logprobs": LOGPROBS, "finish_reason": FINISH_REASON})},
        "usage": USAGE}),
    "/tokenize": _obj({"tokens": {"type": "array", "items": INT}, "count": INT, "max_model_len": INT}),
    "/detokenize": _obj({"prompt": STR}),
    "/health": _obj({"status": STR, "model": STR}),
}

# the schema of each event (OpenAPI 3.1 has no itemSchema: `schema` describes one event)
EVENT_STREAM = {"text/event-stream": {"schema": _obj({"data": {"type": "string", "description": (
    "one of OpenAI's chunk objects as JSON, or `[DONE]` after the last one")}})}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def install_openapi(app: FastAPI, key_check: Callable | None) -> None:
    """Serve the schema below at /openapi.json; `key_check` is the dependency of the routes
    behind the API key (None: no key is set, so no route answers 401)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, key_check)
        return app.openapi_schema

    app.openapi = schema


def build_schema(app: FastAPI, key_check: Callable | None) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_BODY
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 bodies: never sent
        schemas.pop(name, None)
    integral_bounds(spec)
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            operation = spec["paths"][route.path_format][method.lower()]
            describe(operation, route, key_check)
    return spec


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def integral_bounds(node: Any) -> None:
    """FastAPI's schema models hold bounds as floats: 2**64 became 1.8446744073709552e+19, and a
    validator compares 2**64 + 382 with that float as equal. Our integral bounds (powers of two
    among them) are exact as floats, so turn them back into integers."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                integral_bounds(value)
    elif isinstance(node, list):
        for item in node:
            integral_bounds(item)


def describe(operation: dict[str, Any], route: APIRoute, key_check: Callable | None) -> None:
    """Add the answers the route can give to its operation."""
    answers = operation.setdefault("responses", {})
    answers.pop("422", None)
    ok = answers.setdefault("200", {"description": "Successful Response"})
    if route.path in ANSWERS:
        ok["content"] = {"application/json": {"schema": ANSWERS[route.path]}}
    if route.path == "/metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string", "description": "Prometheus text format"}}}
    body = route.body_field.field_info.annotation if route.body_field is not None else None
    if body is not None:
        answers["400"] = _error("A malformed body or a bad parameter (`param` names it)")
    if key_check is not None and any(d.dependency == key_check for d in route.dependencies):
        answers["401"] = _error("A missing or wrong API key")
    if (body is not None and "model" in body.model_fields) or "{" in route.path:
        answers["404"] = _error("No such model")
    if isinstance(body, type) and issubclass(body, SamplingFields):
        ok.setdefault("content", {}).update(EVENT_STREAM)
        answers["429"] = _error("The queue is full: retry after the time given", headers={
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}})
        answers["503"] = _error("The server is shutting down")
