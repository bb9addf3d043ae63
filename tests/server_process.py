"""A real `minicpm serve` process on loopback for the server and web-page tests."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path


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
