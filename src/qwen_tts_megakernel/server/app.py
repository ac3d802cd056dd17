"""The FastAPI app: chunked HTTP, an OpenAI-compatible speech API, a WebSocket with streamed text, metrics.

    POST /tts/stream                  {text, language, speaker, max_new_tokens, seed?} -> chunked PCM16 24 kHz
    POST /v1/audio/speech             OpenAI's shape (mp3 | opus | aac | flac | wav | pcm, stream_format audio | sse,
                                      OpenAI's voice names) + extensions
    WS   /v1/audio/speech/stream      contexts with streamed text input (protocol in docs/server.md)
    GET  /v1/audio/voices  /v1/models  /health  /metrics
    GET  /  /docs                     the demo page and the API description (web_page.py)

See docs/server.md for the protocol and examples.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Request as EngineRequest
from ..engine import Synthesizer, pick_seed
from ..live import LiveUtterance
from ..prompt import PromptError
from ..word_timing import WordTimeline, timestamps_message
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .audio_formats import AudioEncoder, encode_whole
from .output_format import StreamOutput
from .stream_log import log_refusal, log_stream
from ..engine import EngineUnavailable
from .protocol import (LOOPBACK_HOSTS, BadRequest, ServerSettings, SpeechParams, StreamedText, Validator, parse_json,
                       shown)
from .errors import install_resource_handlers
from .limits import RequestLimits, limited_http_protocol
from .omni_protocol import FirstMessageReplay, OmniSession, first_message_is_omni
from .voices_api import body_caps, body_deadlines, voices_router
from .web_page import add_offline_docs, web_router
from .ws_limits import ClientStreams, SessionRegistry, client_address
from .worker import EngineWorker, LiveJob, QueueFull, ServerJob, TextJob

log = logging.getLogger("qwen_tts_megakernel.server")

WS_PATH = "/v1/audio/speech/stream"


def model_names_for(model: str) -> list[str]:
    names = [model]
    base = Path(str(model)).name
    for extra in (base, "qwen3-tts"):
        if extra and extra not in names:
            names.append(extra)
    return names


def engine_health(worker: EngineWorker) -> tuple[bool, str]:
    """(ok, reason) of the engine: its scheduler thread runs and its backend is usable."""
    return worker.health()


# ---------------------------------------------------------------------------------------------------------------
# Browser and exposure guards


def _host_name(value: str) -> str:
    """The host of a Host header or an origin's netloc: "[::1]:8001" -> "::1", "Example.com:80" -> "example.com"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuard:
    """ASGI middleware: the Host header must name an allowed host (DNS rebinding), and a browser's Origin must be
    an allowed one (any web page the user visits could otherwise drive a loopback server). Requests without an
    Origin (curl, SDKs, servers) pass the Origin check."""

    def __init__(self, app, settings: ServerSettings, metrics: ServerMetrics):
        self.app = app
        self.hosts = set(settings.allowed_hosts)
        self.origins = set(settings.allowed_origins) | set(settings.cors_origins)
        self.metrics = metrics

    def refusal(self, headers: dict[bytes, bytes]) -> str | None:
        host = headers.get(b"host")
        if host is not None and "*" not in self.hosts:
            name = _host_name(host.decode("latin-1"))
            if name not in self.hosts:
                return (f"Host {shown(name)} is not allowed (allowed: {', '.join(sorted(self.hosts))}); "
                        "start the server with --allowed-hosts to add it")
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins:
            origin_text = origin.decode("latin-1").strip().lower().rstrip("/")
            try:
                name = urlsplit(origin_text).hostname
            except ValueError:
                name = None
            if origin_text not in self.origins and name not in LOOPBACK_HOSTS:
                return (f"Origin {shown(origin_text)} is not allowed; start the server with --allowed-origins to "
                        "add it")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        reason = self.refusal(dict(scope["headers"]))
        if reason is None:
            return await self.app(scope, receive, send)
        self.metrics.errors_total.labels(kind="forbidden").inc()
        log.warning("refused a request: %s", reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return
        body = json.dumps({"error": {"message": reason, "type": "invalid_request_error", "param": None,
                                     "code": "forbidden"}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RedactApiKey(logging.Filter):
    """Replaces the value of an `api_key` query parameter in log records (uvicorn logs request paths)."""

    PATTERN = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "api_key" in record.msg.lower():
            record.msg = self.PATTERN.sub(r"\1***", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_api_keys_in_logs() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn", log.name):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKey) for f in logger.filters):
            logger.addFilter(RedactApiKey())


def create_app(synth: Synthesizer, *, model_name: str = "qwen3-tts", api_key: str | None = None,
               settings: ServerSettings | None = None) -> FastAPI:
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a non-empty key, or none for a server without authentication")
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    worker = EngineWorker(synth, metrics, max_active=settings.max_active, max_queue=settings.max_queue,
                          consumer_stall_s=settings.consumer_stall_s, queue_timeout_s=settings.queue_timeout_s,
                          text_wait_s=settings.ws_idle_flush_s + 1.0)  # + the WS watcher's longest period
    validator = Validator(synth, settings, model_names_for(model_name))
    sample_rate = synth.sample_rate
    redact_api_keys_in_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    # With a key, the API description is off: /docs and /openapi.json would otherwise be open to anyone. /docs
    # serves its assets from the package (web_page.py), or is off without them.
    app = FastAPI(title="qwen-tts-megakernel", lifespan=lifespan, redoc_url=None, docs_url=None,
                  openapi_url=None if api_key else "/openapi.json")
    add_offline_docs(app)
    if settings.web_page:
        app.include_router(web_router(api_key_required=api_key is not None))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Seed", "X-Sample-Rate", "X-Audio-Encoding", "X-Audio-Channels",
                                           "X-Ignored-Fields"])
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    app.add_middleware(RequestLimits, default_cap=settings.max_body_bytes, caps=body_caps())  # outermost: runs first
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.synth = synth
    app.state.settings = settings
    client_streams = ClientStreams(settings.max_client_streams)
    app.state.ws_sessions = ws_sessions = SessionRegistry()  # drained at shutdown (server/shutdown.py)

    # Helpers -------------------------------------------------------------------------------------------------------

    def error(status: int, message: str, param: str | None = None, kind: str = "bad_request",
              headers: dict | None = None) -> JSONResponse:
        metrics.errors_total.labels(kind=kind).inc()
        log_refusal(status, param, message)
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": param, "code": None}}
        return JSONResponse(body, status_code=status, headers=headers)

    def authorized(headers, query=None) -> bool:
        if not api_key:
            return True
        scheme, _, value = headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() in ("bearer", "api-key") else None  # Api-Key: vLLM-Omni, Baseten
        if token is None and query is not None:
            token = query.get("api_key")
        return token is not None and secrets.compare_digest(token.encode(), api_key.encode())

    def unauthorized() -> JSONResponse:
        return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="unauthorized",
                     headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request):
        """The body as JSON, within the limits: JSON content type (415), size (413), arrival time (408)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise BadRequest(None, f"Content-Type must be application/json, got {shown(content_type or None)}",
                             status=415)
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise BadRequest(None, f"the request body is larger than {limit} bytes", status=413)

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(None, f"the request body is larger than {limit} bytes", status=413)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(None, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                             status=408) from None
        return parse_json(raw, settings)

    def submit_text_job(params: SpeechParams, request: EngineRequest, endpoint: str) -> TextJob:
        job = TextJob(synth, asyncio.get_running_loop(), request=request, seed=pick_seed(params.seed),
                      endpoint=endpoint, max_buffered_chunks=settings.max_buffered_chunks)
        worker.submit(job)
        return job

    def busy(message: str = "the server is at capacity (all stream slots and queue places taken); retry shortly"
             ) -> JSONResponse:
        return error(503, message, kind="queue_full", headers={"Retry-After": str(settings.retry_after_s)})

    async def first_event(job: ServerJob):
        """The job's first event, before the response starts (so that a stream that cannot start is an HTTP
        error, not a broken 200), or None when it waited more than queue_timeout_s for a slot (it is cancelled)."""
        task = asyncio.ensure_future(job.next_event())
        try:
            done, _ = await asyncio.wait({task}, timeout=settings.queue_timeout_s)
            if not done and job.started is None:
                task.cancel()
                job.cancel()
                return None
            return await task
        except BaseException:
            task.cancel()
            job.cancel()
            raise

    async def start_stream(job: ServerJob):
        """(first event, None) or (None, the error response) for a submitted job."""
        first = await first_event(job)
        if first is None:
            return None, busy(f"no stream slot came free within {settings.queue_timeout_s:g} s; retry shortly")
        if first[0] == "error":
            return None, error(500, f"the stream failed before its first audio: {first[1]}", kind="internal")
        return first, None

    async def audio_events(job: ServerJob, first):
        """Yields (kind, payload) from `first` until done; cancels the job if the consumer goes away."""
        try:
            event = first
            while True:
                yield event
                if event[0] == "done":
                    return
                event = await job.next_event()
        finally:
            if not job.finished:
                job.cancel()

    def audio_headers(job: TextJob, encoder: AudioEncoder, output: StreamOutput, params: SpeechParams) -> dict:
        encoding = output.format.encoding if encoder.format.codec is None else encoder.format.codec
        headers = {"X-Sample-Rate": str(output.rate), "X-Audio-Encoding": encoding, "X-Audio-Channels": "1",
                   "X-Seed": str(job.seed()), "Cache-Control": "no-store"}
        if params.ignored:
            headers["X-Ignored-Fields"] = ",".join(params.ignored)
            log.info("%s: ignored %s (this %s model does not take them)", job.endpoint, ", ".join(params.ignored),
                     synth.config.model_type)
        return headers

    async def audio_body(job: ServerJob, first, encoder: AudioEncoder, output: StreamOutput):
        """The response body in the encoder's format, each chunk converted (output_format.py) and encoded as it
        comes (server/audio_formats.py)."""
        ended = False
        try:
            async for kind, payload in audio_events(job, first):
                if kind == "chunk":
                    data = encoder.encode(output.process(payload.pcm))
                    if data:
                        yield data
                elif kind == "error":
                    ended = True
                    log_stream(job, reason="error")
                    # The status line is gone already: end the transfer abnormally so the client sees a broken body.
                    raise RuntimeError(f"stream failed: {payload}")
                elif kind == "done":
                    ended = True
                    log_stream(job, payload)
                    data = encoder.encode(output.finish()) + encoder.finish()
                    if data:
                        yield data
        finally:
            encoder.close()
            if not ended:
                log_stream(job, reason="cancelled (the client went away)")

    async def whole_audio(job: ServerJob, first, response_format: str, output: StreamOutput) -> bytes:
        """The whole utterance in one container with its true length in the header (`"stream": false`)."""
        pcm = []
        async for kind, payload in audio_events(job, first):
            if kind == "chunk":
                pcm.append(output.process(payload.pcm))
            elif kind == "error":
                log_stream(job, reason="error")
                raise BadRequest(None, f"the stream failed: {payload}", status=500)
            elif kind == "done":
                log_stream(job, payload)
                pcm.append(output.finish())
        return encode_whole(response_format, b"".join(pcm), output.rate)

    def sse_delta(data: bytes) -> str:
        return f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(data).decode()})}\n\n"

    async def sse_body(job: TextJob, first, encoder: AudioEncoder, output: StreamOutput):
        async for kind, payload in audio_events(job, first):
            if kind == "chunk":
                data = encoder.encode(output.process(payload.pcm))
                if data:
                    yield sse_delta(data)
            elif kind == "error":
                log_stream(job, reason="error")
                encoder.close()
                yield f"data: {json.dumps({'type': 'error', 'error': {'message': payload}})}\n\n"
            elif kind == "done":
                log_stream(job, payload)
                data = encoder.encode(output.finish()) + encoder.finish()
                if data:
                    yield sse_delta(data)
                n_in = payload.num_text_tokens
                done = {"type": "speech.audio.done",
                        "usage": {"input_tokens": n_in, "output_tokens": payload.frames,
                                  "total_tokens": n_in + payload.frames},
                        "stop_reason": payload.stop_reason, "seed": payload.seed,
                        "audio_seconds": output.samples_out / output.rate}
                yield f"data: {json.dumps(done)}\n\n"

    # Endpoints -----------------------------------------------------------------------------------------------------

    install_resource_handlers(app, error)

    @app.exception_handler(BadRequest)
    async def bad_request_handler(request: Request, exc: BadRequest):
        return error(exc.status, exc.message, exc.param, kind={413: "too_large", 408: "timeout"}.get(exc.status,
                                                                                                     "bad_request"))

    @app.get("/health")
    async def health():
        ok, reason = engine_health(worker)
        body = {"status": "ok" if ok else "unavailable", "reason": reason, "model": model_name,
                "model_type": synth.config.model_type, "sample_rate": sample_rate,
                "active_streams": worker.active_count, "queue_depth": worker.waiting_count,
                "engine_steps": worker.step_totals()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def get_metrics(request: Request):
        if not authorized(request.headers):
            return unauthorized()
        metrics.frames_per_second.set(worker.frames_per_second())
        worker.update_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(voices_router(synth, model_name=model_name, authorized=authorized,
                                     unauthorized=unauthorized, error=error, voice_aliases=validator.voice_aliases))

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request.headers):
            return unauthorized()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "local"}]}

    @app.post("/tts/stream")
    async def tts_stream(request: Request):
        metrics.requests_total.labels(endpoint="tts_stream").inc()
        if not authorized(request.headers):
            return unauthorized()
        params = validator.tts_stream(await read_json(request))
        engine_request = validator.prepare(params, "text")
        try:
            job = submit_text_job(params, engine_request, "tts_stream")
        except (QueueFull, EngineUnavailable):
            return busy()
        first, failed = await start_stream(job)
        if failed is not None:
            return failed
        encoder, output = AudioEncoder("pcm", sample_rate), StreamOutput(params.output, sample_rate)
        return StreamingResponse(audio_body(job, first, encoder, output), media_type="application/octet-stream",
                                 headers=audio_headers(job, encoder, output, params))

    @app.post("/v1/audio/speech")
    async def openai_speech(request: Request):
        metrics.requests_total.labels(endpoint="openai_speech").inc()
        if not authorized(request.headers):
            return unauthorized()
        body = await read_json(request)
        params, response_format, stream_format = validator.openai_speech(body)
        streamed = validator.streamed(body, stream_format)
        engine_request = validator.prepare(params, "input")
        try:
            job = submit_text_job(params, engine_request, "openai_speech")
        except (QueueFull, EngineUnavailable):
            return busy()
        first, failed = await start_stream(job)
        if failed is not None:
            return failed
        encoder, output = AudioEncoder(response_format, sample_rate), StreamOutput(params.output, sample_rate)
        headers = audio_headers(job, encoder, output, params)
        if stream_format == "sse":
            return StreamingResponse(sse_body(job, first, encoder, output), media_type="text/event-stream",
                                     headers=headers)
        if not streamed:
            encoder.close()
            return Response(await whole_audio(job, first, response_format, output), media_type=encoder.media_type,
                            headers=headers)
        return StreamingResponse(audio_body(job, first, encoder, output), media_type=encoder.media_type,
                                 headers=headers)

    @app.websocket(WS_PATH)
    async def ws_speech(websocket: WebSocket):
        metrics.requests_total.labels(endpoint="ws").inc()
        if not authorized(websocket.headers, websocket.query_params):
            metrics.errors_total.labels(kind="unauthorized").inc()
            await websocket.close(code=1008, reason="missing or wrong API key")
            return
        await websocket.accept()
        try:  # the first message tells the protocol (omni_protocol.py); a socket that sends none is closed
            first = await asyncio.wait_for(websocket.receive(), settings.ws_idle_close_s)
        except asyncio.TimeoutError:
            await websocket.close(code=1000, reason=f"no open context for {settings.ws_idle_close_s:g} s")
            return
        if first_message_is_omni(first, settings):
            await OmniSession(websocket, synth, worker, validator, metrics, settings, client_streams=client_streams,
                              sessions=ws_sessions).run(first)
            return
        await WsSession(FirstMessageReplay(websocket, first), synth, worker, validator, metrics, settings,
                        client_streams=client_streams, sessions=ws_sessions).run()

    return app


class WsContext:
    def __init__(self, context_id: str, job: LiveJob, text: StreamedText, words: WordTimeline,
                 output: StreamOutput):
        self.id = context_id
        self.job = job
        self.output = output  # speed, sample rate, encoding (output_format.py)
        self.text = text
        self.words = words  # estimated word timings (word_timing.py), sent as "timestamps" events
        self.audio_seconds = 0.0
        self.cancelled = False
        self.flushed = False
        self.last_word = time.monotonic()  # config or the latest complete word: the idle flush counts from it
        self.submitted_at: float | None = None  # when it took (or queued for) a stream slot
        self.cut = False  # cut by a shutdown
        self.pump: asyncio.Task | None = None

    @property
    def has_speech(self) -> bool:
        """Something to speak: a complete word (an in-context voice opens only at flush, with the whole text)."""
        return self.text.committed_tokens > 0 and self.job.utterance.prime_codes is None


class WsSession:
    """One WebSocket connection: several contexts (at most max_ws_contexts), each a LiveJob on the engine worker.

    A context takes a stream slot (of the engine, and of its client's max_client_streams) only once it has
    something to speak: its first complete word, or its flush. A watcher flushes contexts without a new complete
    word for ws_idle_flush_s (event `idle_flush`), cancels contexts still waiting for a stream slot after
    queue_timeout_s (an `error` event, then `audio_done`) and closes the socket after ws_idle_close_s without an
    open context. At shutdown (`draining`) no context opens, and `cut_contexts` ends the ones left."""

    def __init__(self, ws: WebSocket, synth: Synthesizer, worker: EngineWorker, validator: Validator,
                 metrics: ServerMetrics, settings: ServerSettings, *, client_streams: ClientStreams | None = None,
                 sessions: SessionRegistry | None = None):
        self.ws, self.synth, self.worker, self.validator = ws, synth, worker, validator
        self.metrics, self.settings = metrics, settings
        self.client_streams = client_streams or ClientStreams(settings.max_client_streams)
        self.sessions = sessions or SessionRegistry()
        self.client = client_address(ws)
        self.contexts: dict[str, WsContext] = {}
        self.send_lock = asyncio.Lock()
        self.closed = False
        self.draining = False
        self.idle_since = time.monotonic()  # since when the socket has had no context

    async def send_json(self, obj: dict) -> None:
        if self.closed:
            return
        async with self.send_lock:
            await self.ws.send_text(json.dumps(obj))

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        async with self.send_lock:
            await self.ws.send_bytes(data)

    async def send_words(self, ctx: WsContext, words) -> None:
        if words and not ctx.cancelled:
            message = timestamps_message(ctx.id, words)
            speed = ctx.output.format.speed
            if speed != 1.0:  # the words' times in the stretched audio
                message["start"] = [round(t / speed, 3) for t in message["start"]]
                message["end"] = [round(t / speed, 3) for t in message["end"]]
            await self.send_json(message)

    async def error(self, context_id: str | None, message: str) -> None:
        self.metrics.errors_total.labels(kind="ws_protocol").inc()
        await self.send_json({"type": "error", "context_id": context_id, "message": message})

    async def run(self) -> None:
        watcher = asyncio.create_task(self.watch())
        self.sessions.add(self)
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await self.error(None, "binary messages are not accepted: send JSON text messages")
                    continue
                try:
                    await self.handle(message["text"])
                except BadRequest as exc:
                    await self.error(None, exc.message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.closed = True
            self.sessions.discard(self)
            watcher.cancel()
            for ctx in list(self.contexts.values()):
                ctx.job.cancel()
                if ctx.pump is not None:
                    ctx.pump.cancel()

    async def watch(self) -> None:
        settings = self.settings
        period = max(0.02, min(1.0, settings.ws_idle_flush_s / 4, settings.queue_timeout_s / 4,
                               settings.ws_idle_close_s / 4))
        try:
            while not self.closed:
                await asyncio.sleep(period)
                now = time.monotonic()
                if self.contexts:
                    self.idle_since = now
                elif now - self.idle_since > settings.ws_idle_close_s:
                    async with self.send_lock:
                        await self.ws.close(code=1000, reason=f"no open context for {settings.ws_idle_close_s:g} s")
                    return
                for ctx in list(self.contexts.values()):
                    if ctx.cancelled or ctx.job.finished:
                        continue
                    if not ctx.flushed and now - ctx.last_word > settings.ws_idle_flush_s:
                        await self.send_json({"type": "idle_flush", "context_id": ctx.id,
                                              "idle_s": round(now - ctx.last_word, 3)})
                        await self.flush(ctx)
                    elif (ctx.submitted_at is not None and ctx.job.started is None
                          and now - ctx.submitted_at > settings.queue_timeout_s):
                        await self.error(ctx.id, f"no stream slot came free within {settings.queue_timeout_s:g} s; "
                                                 "the context is cancelled, retry it")
                        ctx.cancelled = True
                        ctx.job.cancel()
        except Exception:  # noqa: BLE001 - the socket is gone; run() cleans up
            pass

    async def flush(self, ctx: WsContext) -> None:
        ctx.flushed = True
        try:
            ctx.text.finish()
        except BadRequest as exc:
            await self.error(ctx.id, exc.message)
        ctx.job.request_flush()
        ctx.words.flush()
        await self.take_slot(ctx)

    async def take_slot(self, ctx: WsContext) -> bool:
        """Submit the context's job (once): within its client's max_client_streams and the engine's slots and
        queue, else an `error` and the context is dropped (no `audio_done`: it never started)."""
        if ctx.submitted_at is not None:
            return True
        if not self.client_streams.acquire(self.client):
            self.metrics.errors_total.labels(kind="queue_full").inc()
            await self.error(ctx.id, f"this client has {self.client_streams.limit} contexts speaking or waiting "
                                     "for a stream slot, the limit; let one finish before starting another")
            self.drop(ctx)
            return False
        try:
            self.worker.submit(ctx.job)
        except (QueueFull, EngineUnavailable):
            self.client_streams.release(self.client)
            self.metrics.errors_total.labels(kind="queue_full").inc()
            await self.send_json({"type": "error", "context_id": ctx.id,
                                  "message": "the server is at capacity; retry this context shortly"})
            self.drop(ctx)
            return False
        ctx.submitted_at = time.monotonic()
        return True

    def drop(self, ctx: WsContext) -> None:
        """Forget a context that never took a slot."""
        ctx.cancelled = True
        if self.contexts.get(ctx.id) is ctx:
            del self.contexts[ctx.id]
        if ctx.pump is not None:
            ctx.pump.cancel()

    async def end_unsubmitted(self, ctx: WsContext, reason: str) -> None:
        """`audio_done` for a context that ends before it took a slot (cancelled, or cut by a shutdown)."""
        self.drop(ctx)
        await self.send_json({"type": "audio_done", "context_id": ctx.id, "stop_reason": reason, "frames": 0,
                              "audio_seconds": 0.0, "time_to_first_audio_ms": None, "elapsed_ms": 0.0,
                              "seed": ctx.job.seed(), "first_chunk_ms": {}})

    async def cut_contexts(self, grace_s: float) -> None:
        """At shutdown, after the grace period: every context left gets an `error`, then its `audio_done`."""
        for ctx in list(self.contexts.values()):
            if ctx.job.finished:
                continue
            await self.error(ctx.id, f"the server is shutting down: this context did not finish within the "
                                     f"{grace_s:g} s grace period and was cut")
            ctx.cut = True
            if ctx.submitted_at is None:
                await self.end_unsubmitted(ctx, "shutdown")
            else:
                ctx.job.cancel()

    async def handle(self, text: str) -> None:
        if len(text) > self.settings.max_ws_message_bytes:
            await self.error(None, f"a message is larger than {self.settings.max_ws_message_bytes} bytes")
            return
        msg = parse_json(text, self.settings)
        if not isinstance(msg, dict):
            await self.error(None, "a message must be a JSON object with a 'type'")
            return
        kind = msg.get("type")
        cid = msg.get("context_id")
        if not isinstance(cid, str) or not cid or len(cid.encode("utf-8", "replace")) > 255:
            await self.error(None, "'context_id' must be a non-empty string of at most 255 bytes")
            return
        try:
            cid.encode("utf-8")
        except UnicodeEncodeError:
            await self.error(None, "'context_id' is not valid Unicode (a lone UTF-16 surrogate)")
            return
        if kind not in ("config", "text", "flush", "cancel"):
            await self.error(cid, f"unknown message type {shown(kind)}; expected config, text, flush or cancel")
            return
        ctx = self.contexts.get(cid)
        if kind == "config":
            if ctx is not None:
                await self.error(cid, f"context {shown(cid)} already exists; config must be its first message")
                return
            await self.open_context(cid, msg)
        elif kind == "text":
            delta = msg.get("text")
            if not isinstance(delta, str):
                await self.error(cid, f"'text' must be a string, got {type(delta).__name__}")
                return
            if ctx is None:
                ctx = await self.open_context(cid, {})
                if ctx is None:
                    return
            if ctx.flushed:
                await self.error(cid, f"context {shown(cid)} was flushed; start a new context for more text")
                return
            words = ctx.text.committed_tokens
            try:
                piece = ctx.text.add(delta)
            except BadRequest as exc:
                await self.error(cid, exc.message)
                return
            if ctx.text.committed_tokens > words:
                ctx.last_word = time.monotonic()
            if piece:
                ctx.job.add_text(piece)
                ctx.words.add_text(piece)
            if ctx.has_speech:
                await self.take_slot(ctx)
        elif kind == "flush":
            if ctx is None:
                await self.error(cid, f"unknown context {shown(cid)}")
                return
            if not ctx.flushed:
                await self.flush(ctx)
        elif kind == "cancel":
            if ctx is None:
                return  # already finished (or never existed): nothing to stop
            if ctx.submitted_at is None:
                await self.end_unsubmitted(ctx, "cancelled")
                return
            ctx.cancelled = True
            ctx.job.cancel()

    async def open_context(self, cid: str, msg: dict) -> WsContext | None:
        if self.draining:
            await self.error(cid, "the server is shutting down: no new contexts; reconnect to another server")
            return None
        open_contexts = sum(1 for c in self.contexts.values() if not (c.cancelled or c.job.finished))
        if open_contexts >= self.settings.max_ws_contexts:
            await self.error(cid, f"this socket has {open_contexts} open contexts, the limit; cancel one or let "
                                  "one finish before opening another")
            return None
        try:
            params = self.validator.ws_config(msg)
            utterance = LiveUtterance(self.synth, voice=params.voice, language=params.language,
                                      instruct=params.instruct, seed=pick_seed(params.seed),
                                      max_new_tokens=params.max_new_tokens, **params.sampling)
        except BadRequest as exc:
            await self.error(cid, exc.message)
            return None
        except (PromptError, ValueError, TypeError) as exc:
            await self.error(cid, str(exc))
            return None
        job = LiveJob(self.synth, asyncio.get_running_loop(), utterance=utterance, endpoint="ws",
                      max_buffered_chunks=self.settings.max_buffered_chunks)
        ctx = WsContext(cid, job, StreamedText(self.synth.tokenizer, self.settings.max_text_chars,
                                               self.settings.max_text_tokens),
                        WordTimeline(self.synth.tokenizer.encode_user),
                        StreamOutput(params.output, self.synth.sample_rate))
        self.contexts[cid] = ctx
        ctx.pump = asyncio.create_task(self.pump(ctx))
        return ctx

    async def pump(self, ctx: WsContext) -> None:
        """Job events -> WebSocket messages for one context."""
        tag = bytes([len(ctx.id.encode())]) + ctx.id.encode()
        started = False

        async def start():
            nonlocal started
            if not started:
                started = True
                await self.send_json({"type": "audio_start", "context_id": ctx.id,
                                      "sample_rate": ctx.output.rate, "encoding": ctx.output.format.encoding,
                                      "channels": 1})

        try:
            while True:
                kind, payload = await ctx.job.next_event()
                if kind == "chunk":
                    if ctx.cancelled:
                        continue
                    await start()
                    data = ctx.output.process(payload.pcm)
                    if data:
                        await self.send_bytes(tag + data)
                    ctx.audio_seconds += len(payload.pcm) / self.synth.sample_rate
                    await self.send_words(ctx, ctx.words.due(ctx.audio_seconds))
                elif kind == "error":
                    await self.error(ctx.id, payload)
                elif kind == "done":
                    await start()
                    info = asdict(payload)
                    stages = info["first_chunk_ms"]  # where the first chunk's time went, stage by stage
                    reason = "shutdown" if ctx.cut else "cancelled" if ctx.cancelled else info["stop_reason"]
                    log_stream(ctx.job, payload, reason=reason, context_id=ctx.id)
                    rest = ctx.output.finish()
                    if rest and not ctx.cancelled:
                        await self.send_bytes(tag + rest)
                    await self.send_words(ctx, ctx.words.finish(ctx.audio_seconds, reason == "eos"))
                    await self.send_json({"type": "audio_done", "context_id": ctx.id, "stop_reason": reason,
                                          "frames": info["frames"],
                                          "audio_seconds": round(ctx.output.samples_out / ctx.output.rate, 4),
                                          "time_to_first_audio_ms": None if info["time_to_first_audio_ms"] is None
                                          else round(info["time_to_first_audio_ms"], 2),
                                          "elapsed_ms": round(info["elapsed_ms"], 2), "seed": info["seed"],
                                          "first_chunk_ms": {k: round(v, 3) for k, v in stages.items()}})
                    break
        except Exception:  # noqa: BLE001 - socket gone
            ctx.job.cancel()
        finally:
            if ctx.submitted_at is not None:
                self.client_streams.release(self.client)
            if self.contexts.get(ctx.id) is ctx:
                del self.contexts[ctx.id]


# ---------------------------------------------------------------------------------------------------------------
# `qwen-tts-mk serve`


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def uvicorn_config(app: FastAPI, host: str, port: int, settings: ServerSettings, log_level: str = "info"):
    """The uvicorn configuration that carries the server's connection limits."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="websockets-sansio", lifespan="on",
                          http=limited_http_protocol(settings, body_deadlines(settings)),
                          h11_max_incomplete_event_size=settings.max_header_bytes,
                          ws_max_size=settings.max_ws_message_bytes, timeout_keep_alive=settings.keep_alive_s,
                          limit_concurrency=settings.max_connections)


def serve_settings(args) -> ServerSettings:
    """The settings of `serve`: its options; Host names default to loopback plus the bound name (any Host when
    bound to every interface, where the API key or the explicit opt-out guards the server)."""
    host = args.host
    if getattr(args, "allowed_hosts", None) is not None:
        return ServerSettings.from_args(args)
    hosts = ("*",) if host in WILDCARD_HOSTS else tuple(dict.fromkeys(LOOPBACK_HOSTS + (host.strip("[]"),)))
    return ServerSettings.from_args(args, allowed_hosts=hosts)


def run_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("qwen-tts-mk serve: error: the server needs its extra: pip install 'qwen-tts-megakernel[server]'",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = getattr(args, "api_key", None)
    if api_key is None:
        api_key = os.environ.get("QWEN_TTS_MK_API_KEY")
    if api_key is not None and not api_key.strip():
        print("qwen-tts-mk serve: error: the API key is empty (--api-key or QWEN_TTS_MK_API_KEY); give a key, or "
              "leave both unset", file=sys.stderr)
        return 2
    host, port = args.host, args.port
    if not _is_loopback(host) and not api_key and not getattr(args, "allow_unauthenticated_public", False):
        print(f"qwen-tts-mk serve: error: binding {host} without --api-key lets anyone who can reach the port use "
              "the server; give --api-key, or pass --allow-unauthenticated-public if that is what you want",
              file=sys.stderr)
        return 2
    try:
        settings = serve_settings(args)
    except ValueError as exc:
        print(f"qwen-tts-mk serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"loading {args.model} ({args.backend} backend)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    synth = Synthesizer.from_pretrained(args.model, backend=args.backend, device=args.device,
                                        dtype=getattr(args, "dtype", None), max_streams=settings.max_active)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    try:
        app = create_app(synth, model_name=args.model, api_key=api_key, settings=settings)
    except ValueError as exc:  # a bad setting, e.g. a voice alias naming a speaker the model lacks
        print(f"qwen-tts-mk serve: error: {exc}", file=sys.stderr)
        return 2
    from .shutdown import draining_server

    config = uvicorn_config(app, host, port, settings)
    sock = getattr(args, "socket", None) or config.bind_socket()  # the CLI binds before loading the model
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown_host}:{port} (WebSocket ws://{shown_host}:{port}{WS_PATH})", file=sys.stderr,
          flush=True)
    draining_server(app, config).run(sockets=[sock])
    return 0
