"""A real `minicpm serve` process on loopback for the server and web-page tests, and the pytest
fixtures of the server tests (a tiny checkpoint served with an API key, the same model loaded
in the test process as the reference, an `openai` client); tests/conftest.py registers them."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import save_tiny_checkpoint


def start_server(checkpoint: Path | None, *args: str) -> tuple[subprocess.Popen, str]:
    """Run `minicpm serve` on a free port (checkpoint None: the default model); returns the
    process and its base URL once it answers."""
    model = [] if checkpoint is None else [str(checkpoint)]
    cmd = [sys.executable, "-m", "minicpm.cli.main", "serve", *model, "--port", "0", "--threads", "2",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    url = None
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited with {proc.wait()} before it was ready")
        found = re.search(r"at (http://\S+)", line)
        url = found.group(1) if found else None
        assert time.time() < deadline, "server did not start in 120 s"
    # keep reading its output so that a chatty server never blocks on a full pipe
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


KEY = "sk-test-key"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = start_server(checkpoint, "--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A tiny model whose replies can run to 4000 tokens (seconds)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("long"), context=4096)


@pytest.fixture(scope="module")
def long_server(long_checkpoint):
    proc, url = start_server(long_checkpoint, "--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def local(checkpoint):
    """The same model in this process: the reference for the server's answers."""
    import minicpm

    return minicpm.load(checkpoint)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def error_of(response: httpx.Response, status: int | None = None) -> dict:
    """The OpenAI error object of an answer (with exactly OpenAI's fields), after checking its
    status where one is given."""
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]
