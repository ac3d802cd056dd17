"""Helpers for tests and offline demos: a TTS server subprocess on a free loopback port, and a stub LLM.

    with TTSServerProcess(model_dir) as server:          # python -m qwen_tts_megakernel.cli serve ...
        server.base_url                                   # http://127.0.0.1:<port>
    with StubLLMServer() as llm:                          # OpenAI-compatible streaming chat completions
        llm.base_url                                      # http://127.0.0.1:<port>/v1

Neither needs a network, a GPU or a model download.
"""

from __future__ import annotations

import asyncio
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
from typing import Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TTSServerProcess:
    """``python -m qwen_tts_megakernel.cli serve --model DIR --port P --backend reference --device cpu``.

    Started on enter (waits until GET /health answers), terminated on exit. ``extra_args`` are added to the
    command line (e.g. ["--api-key", "k"]). Its output goes to ``log_path`` (a temporary file by default) and is
    shown in the error if it fails to start.
    """

    def __init__(self, model_dir: str | Path, *, extra_args: list[str] | None = None, startup_timeout_s: float = 90.0,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.model_dir = str(model_dir)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "qwen_tts_megakernel.cli", "serve", "--model", self.model_dir,
                "--host", "127.0.0.1", "--port", str(self.port), "--backend", "reference", "--device", "cpu",
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


# -------------------------------------------------------------------------------------------------------------
# Stub LLM: an OpenAI-compatible chat-completions server (streaming SSE) on a background thread


def echo_reply(messages: list[dict]) -> str:
    """The default stub reply: a short answer that quotes the last user message."""
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "") or ""
    if isinstance(last, list):  # content parts
        last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
    return f"You said: {last.strip()} That is a fine thing to say. Anything else?"


class StubLLMServer:
    """POST /v1/chat/completions (stream true or false) and GET /v1/models, answered by ``reply(messages)``.

    Streams the reply a few characters per chunk, ``token_delay_s`` apart, like a real LLM. Records the requests
    it got in ``requests``.
    """

    def __init__(self, reply: Callable[[list[dict]], str] = echo_reply, *, token_delay_s: float = 0.01,
                 chunk_chars: int = 4, model: str = "stub-llm"):
        self.reply = reply
        self.token_delay_s = token_delay_s
        self.chunk_chars = chunk_chars
        self.model = model
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _chat(self, request):
        from aiohttp import web

        body = await request.json()
        self.requests.append(body)
        text = self.reply(body.get("messages", []))
        created = int(time.time())
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": created, "model": self.model}
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-stub", "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        await send(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        for i in range(0, len(text), self.chunk_chars):
            await asyncio.sleep(self.token_delay_s)
            await send(base | {"choices": [{"index": 0, "delta": {"content": text[i:i + self.chunk_chars]},
                                            "finish_reason": None}]})
        await send(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(base | {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                        "total_tokens": 2}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    def _serve(self):
        from aiohttp import web

        async def main():
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> "StubLLMServer":
        self._thread = threading.Thread(target=self._serve, name="stub-llm", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"stub LLM failed to start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "StubLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
