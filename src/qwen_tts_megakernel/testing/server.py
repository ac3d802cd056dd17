"""Servers for tests, benchmarks and examples, on free loopback ports.

    with running_server(synth) as (base_url, app):     # uvicorn in a background thread of this process
        ...
    with TTSServerProcess(model_dir) as server:         # `qwen-tts-mk serve` in a subprocess
        server.base_url                                 # http://127.0.0.1:<port>
    prometheus_sum(server.metrics_text(), "qwen_tts_streams_total", stop_reason="cancelled")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..engine import Synthesizer
from ..server.protocol import ServerSettings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TTSServerProcess:
    """``python -m qwen_tts_megakernel.cli serve --model M --port P --backend B [--device D]`` in a subprocess.

    Started on enter (waits until GET /health answers; `health` holds its answer), terminated on exit.
    ``extra_args`` are added to the command line (e.g. ["--api-key", "k"]). Its output goes to ``log_path`` (a
    temporary file by default) and is shown in the error if it fails to start.
    """

    def __init__(self, model_dir: str | Path, *, backend: str = "reference", device: str | None = "cpu",
                 extra_args: list[str] | None = None, startup_timeout_s: float = 90.0,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.model_dir = str(model_dir)
        self.backend, self.device = backend, device
        self.health: dict = {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        device = ["--device", self.device] if self.device else []
        return [sys.executable, "-m", "qwen_tts_megakernel.cli", "serve", "--model", self.model_dir,
                "--host", "127.0.0.1", "--port", str(self.port), "--backend", self.backend, *device,
                *self.extra_args]

    def start(self) -> "TTSServerProcess":
        if self.log_path is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="qwen-tts-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the TTS server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.health = json.loads(r.read() or b"{}")
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the TTS server did not answer /health in {self.startup_timeout_s} s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def metrics_text(self, headers: dict[str, str] | None = None) -> str:
        req = urllib.request.Request(f"{self.base_url}/metrics", headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def __enter__(self) -> "TTSServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


def first_audio_s(url: str, body: dict, timeout_s: float = 30) -> float:
    """Seconds from a POST of `body` to `url`/tts/stream until its first audio bytes (needs httpx)."""
    import httpx

    start = time.monotonic()
    with httpx.stream("POST", f"{url}/tts/stream", json=body, timeout=timeout_s) as r:
        assert r.status_code == 200, r.read()
        for piece in r.iter_raw():
            if piece:
                return time.monotonic() - start
    raise AssertionError("no audio")


def prometheus_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group("name") != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group("labels") or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group("value"))
    return total


@contextlib.contextmanager
def running_server(synth: Synthesizer, *, model_name: str = "qwen3-tts", api_key: str | None = None,
                   settings: ServerSettings | None = None, port: int | None = None, log_level: str = "warning",
                   send_buffer_bytes: int | None = None):
    """The app on 127.0.0.1 in a thread: yields (base URL, app). `send_buffer_bytes`: the kernel send buffer of every
    connection (SO_SNDBUF of the listening socket, which accepted ones inherit), so that a client that stops
    reading backs the server up after kilobytes instead of megabytes."""
    import socket

    from ..server.app import create_app, uvicorn_config
    from ..server.shutdown import draining_server

    settings = settings or ServerSettings()
    app = create_app(synth, model_name=model_name, api_key=api_key, settings=settings)
    port = port or free_port()
    server = draining_server(app, uvicorn_config(app, "127.0.0.1", port, settings, log_level=log_level))
    run = server.run
    if send_buffer_bytes is not None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
        listener.bind(("127.0.0.1", port))

        def run():
            server.run(sockets=[listener])
    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
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
