"""A stub LLM for tests and offline demos (the TTS server subprocess is server.testing.TTSServerProcess).

    with StubLLMServer() as llm:                          # OpenAI-compatible streaming chat completions
        llm.base_url                                      # http://127.0.0.1:<port>/v1

It needs no network, GPU or model download.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Callable

from .server import free_port


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
