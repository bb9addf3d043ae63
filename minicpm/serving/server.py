"""Running the server: bind the port first, then serve the app with uvicorn and print its URL.

`minicpm serve` calls `listening_socket` before it loads the model, so a bad or taken port is a
clear error at once; `serve` binds again and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import socket

from minicpm.errors import MiniCPMError
from minicpm.serving.app import create_app
from minicpm.serving.engine import Engine
from minicpm.serving.images import ImageLimits


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
          api_key: str | None = None, log_level: str = "warning", image_limits: ImageLimits | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; the engine is closed on the way out."""
    import uvicorn

    sock = listening_socket(host, port)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{sock.getsockname()[1]}"

    def ready() -> None:
        print(f"minicpm: serving {model_name} at {url}  (OpenAI API: {url}/v1, web chat: {url}/)", flush=True)

    app = create_app(engine, tokenizer, model_name, api_key, on_ready=ready, image_limits=image_limits)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
