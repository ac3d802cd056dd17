"""A real uvicorn server on a free loopback port, in a background thread (tests, benchmarks, examples).

    with running_server(synth) as base_url:      # "http://127.0.0.1:PORT"
        ...
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from ..engine import Synthesizer
from .app import create_app
from .protocol import ServerSettings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(synth: Synthesizer, *, model_name: str = "qwen3-tts", api_key: str | None = None,
                   settings: ServerSettings | None = None, port: int | None = None, log_level: str = "warning"):
    import uvicorn

    app = create_app(synth, model_name=model_name, api_key=api_key, settings=settings)
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, ws="websockets-sansio",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
