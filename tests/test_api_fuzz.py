"""Property-based fuzzing of `minicpm serve` from its own /openapi.json, with schemathesis.

A real server process (a tiny checkpoint, a 32-token context so that every generation is
short, an API key) gets requests that schemathesis generates for every operation of the
schema, valid and not: each answer must not be a 5xx, and its status code, content type,
headers and body must be ones the schema documents. The run is deterministic (a fixed seed,
derandomized) and bounded: FUZZ_EXAMPLES requests per operation, of valid bodies and again of
invalid ones. For a longer, random run: `FUZZ_SEED=random FUZZ_EXAMPLES=300 pytest -s tests/test_api_fuzz.py`.
The same server then gets the hostile requests that once made it fail or answer badly.
"""

from __future__ import annotations

import json
import os
import random
import zlib

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import save_tiny_checkpoint
from tests.server_process import error_of, start_server, stop_server

KEY = "sk-fuzz-key"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))  # per operation and mode (valid, invalid)
RANDOM = os.environ.get("FUZZ_SEED") == "random"
SEED = random.randrange(2**32) if RANDOM else int(os.environ.get("FUZZ_SEED", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("fuzz"), context=64)
    proc, url = start_server(checkpoint, "--api-key", KEY, "--context", "32")
    yield url
    stop_server(proc)


def fuzz(operation, mode: GenerationMode, base_url: str) -> None:
    """EXAMPLES generated requests to one operation; raises on the first answer that fails a check."""
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    def check(case) -> None:
        # most cases carry the key (so that their bodies are checked), one in four not (a 401)
        headers = {"Authorization": f"Bearer {KEY}"} if zlib.crc32(repr(case.body).encode()) % 4 else {}
        response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=60)
        assert response.status_code < 500

    (hypothesis.seed(SEED)(check) if RANDOM else check)()


def test_every_operation_answers_as_documented(server):
    print(f"fuzzing with {'seed ' + str(SEED) if RANDOM else 'derandomized examples'}, "
          f"{EXAMPLES} per operation and mode")
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "GET /metrics"} <= labels
    assert "401" in schema.raw_schema["paths"]["/v1/completions"]["post"]["responses"]
    failures = []
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            try:
                fuzz(operation, mode, server)
            except Exception as exc:  # noqa: BLE001 - gathered, so that one run shows every failing operation
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    metrics = httpx.get(f"{server}/metrics").text
    sent = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("minicpm_requests_total{"))
    assert sent >= 8 * EXAMPLES  # the cases did reach the server (8 modes of operations with a body)
    print(f"{sent:.0f} requests answered, none with a 5xx")


# ---------------------------------------------------------------------- what fuzzing and hostile clients found


def post(server: str, path: str, body, key: bool = True) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)


def refused(response: httpx.Response) -> dict:
    """The error object of a 400 answer."""
    return error_of(response, 400)


CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "\ud800 x"}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
     "messages.0.content.0.text"),
    (CHAT, {"messages": HI, "stop": ["ok", "\udc00"]}, "stop.1"),
    (CHAT, {"messages": HI, "model": "\ud800"}, "model"),
    ("/v1/completions", {"prompt": "\ud800 x"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "\ud800"]}, "prompt.1"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
])
def test_a_lone_surrogate_is_a_400_that_names_the_field(server, path, body, param):
    err = refused(post(server, path, body))  # json.dumps writes the surrogate as a \ud800 escape
    assert err["param"] == param and "surrogate" in err["message"]


def test_cesu8_bytes_are_a_400(server):
    raw = b'{"prompt": "\xed\xa0\x80 x", "max_tokens": 1}'  # a surrogate encoded as if it were a character
    assert "surrogate" in refused(post(server, "/v1/completions", raw))["message"]


def test_seeds_take_any_64_bit_value(server):
    def texts(seed):
        r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 2, "seed": seed})
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    for seed in (2**64 - 1, 2**63, -(2**63)):
        first = texts(seed)
        assert texts(seed) == first  # still reproducible, with each choice its own seed
    for seed in (2**64, -(2**63) - 1):
        assert refused(post(server, "/v1/completions", {"prompt": "hi", "seed": seed}))["param"] == "seed"


def test_messages_name_what_is_wrong(server):
    err = refused(post(server, CHAT, b""))
    assert err["message"] == "The request body is missing: send the parameters as a JSON object."
    err = refused(post(server, CHAT, {"model": "tiny-minicpm"}))
    assert err["param"] == "messages" and err["message"] == "Missing required parameter: 'messages'."
    err = refused(post(server, "/v1/completions", {"prompt": [5, -1]}))
    assert err["param"] == "prompt.1" and "greater than or equal to 0" in err["message"]
    err = refused(post(server, "/v1/completions", {"prompt": [[5], [6, -1]]}))
    assert err["param"] == "prompt.1.1" and "greater than or equal to 0" in err["message"]
    err = refused(post(server, "/detokenize", {"tokens": [1, False]}))  # not token 0
    assert err["param"] == "tokens.1" and "valid integer" in err["message"]
    err = refused(post(server, "/v1/completions", {"prompt": "word " * 40}))
    assert "the prompt takes " in err["message"] and err["code"] == "context_length_exceeded"
    err = refused(post(server, CHAT, {"messages": [{"role": "user", "content": "word " * 40}]}))
    assert "the messages take " in err["message"] and err["param"] == "messages"
    for body in ({}, {"prompt": "a", "messages": HI}, {"prompt": None}):
        assert "exactly one of 'prompt' or 'messages'" in refused(post(server, "/tokenize", body))["message"]
    assert refused(post(server, "/v1/completions", {"prompt": ""}))["param"] == "prompt"


def test_the_schema_documents_the_answers(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "422" not in answers
            if "requestBody" in operation:
                assert answers["400"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    for path in (CHAT, "/v1/completions"):
        answers = spec["paths"][path]["post"]["responses"]
        assert set(answers["200"]["content"]) == {"application/json", "text/event-stream"}
        assert {"401", "404", "429"} <= set(answers) and "Retry-After" in answers["429"]["headers"]
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]  # health stays open
    schemas = spec["components"]["schemas"]
    assert len(schemas["TokenizeRequest"]["oneOf"]) == 2
    token = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert token["type"] == "integer" and token["minimum"] == 0
    seed = schemas["CompletionRequest"]["properties"]["seed"]["anyOf"][0]  # exact, not 1.8446744073709552e+19
    assert (seed["minimum"], seed["exclusiveMaximum"]) == (-(2**63), 2**64)


def test_405_says_which_methods_are_allowed(server):
    r = httpx.get(f"{server}/v1/completions")
    assert error_of(r, 405) and r.headers["allow"] == "POST"
