"""The FastAPI app: chunked HTTP, an OpenAI-compatible speech API, a WebSocket with streamed text, metrics.

    POST /tts/stream                  {text, language, speaker, max_new_tokens, seed?} -> chunked PCM16 24 kHz
    POST /v1/audio/speech             OpenAI's shape (pcm | wav, stream_format audio | sse) + extensions
    WS   /v1/audio/speech/stream      contexts with streamed text input (protocol in docs/server.md)
    GET  /v1/audio/voices  /v1/models  /health  /metrics

See docs/server.md for the protocol and examples.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Request as EngineRequest
from ..engine import Synthesizer, pick_seed
from ..live import LiveUtterance
from ..prompt import PromptError
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import BadRequest, ServerSettings, SpeechParams, Validator, wav_header
from ..engine import EngineUnavailable
from .voices_api import voices_router
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


def create_app(synth: Synthesizer, *, model_name: str = "qwen3-tts", api_key: str | None = None,
               settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    worker = EngineWorker(synth, metrics, max_active=settings.max_active, max_queue=settings.max_queue)
    validator = Validator(synth, settings, model_names_for(model_name))
    sample_rate = synth.sample_rate

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="qwen-tts-megakernel", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.synth = synth
    app.state.settings = settings

    # Helpers -------------------------------------------------------------------------------------------------------

    def error(status: int, message: str, param: str | None = None, kind: str = "bad_request",
              headers: dict | None = None) -> JSONResponse:
        metrics.errors_total.labels(kind=kind).inc()
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": param, "code": None}}
        return JSONResponse(body, status_code=status, headers=headers)

    def authorized(headers, query=None) -> bool:
        if not api_key:
            return True
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token is None and query is not None:
            token = query.get("api_key")
        return token is not None and secrets.compare_digest(token.encode(), api_key.encode())

    def unauthorized() -> JSONResponse:
        return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="unauthorized",
                     headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(None, f"the request body is not valid JSON: {exc}") from exc

    def submit_text_job(params: SpeechParams, request: EngineRequest, endpoint: str) -> TextJob:
        job = TextJob(synth, asyncio.get_running_loop(), request=request, seed=pick_seed(params.seed),
                      endpoint=endpoint, max_buffered_chunks=settings.max_buffered_chunks)
        worker.submit(job)
        return job

    def busy() -> JSONResponse:
        return error(503, "the server is at capacity (all stream slots and queue places taken); retry shortly",
                     kind="queue_full", headers={"Retry-After": str(settings.retry_after_s)})

    async def audio_events(job: ServerJob):
        """Yields (kind, payload) until done; cancels the job if the consumer goes away."""
        try:
            while True:
                kind, payload = await job.next_event()
                yield kind, payload
                if kind == "done":
                    return
        finally:
            if not job.finished:
                job.cancel()

    def audio_headers(job: TextJob) -> dict:
        return {"X-Sample-Rate": str(sample_rate), "X-Audio-Encoding": "pcm_s16le", "X-Audio-Channels": "1",
                "X-Seed": str(job.seed()), "Cache-Control": "no-store"}

    async def pcm_body(job: ServerJob, with_wav_header: bool):
        if with_wav_header:
            yield wav_header(sample_rate)
        async for kind, payload in audio_events(job):
            if kind == "chunk":
                yield payload.pcm.astype("<i2").tobytes()
            elif kind == "error":
                # The status line is gone already: end the transfer abnormally so the client sees a broken body.
                raise RuntimeError(f"stream failed: {payload}")

    async def sse_body(job: TextJob, with_wav_header: bool):
        first = True
        async for kind, payload in audio_events(job):
            if kind == "chunk":
                data = payload.pcm.astype("<i2").tobytes()
                if first and with_wav_header:
                    data = wav_header(sample_rate) + data
                first = False
                yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(data).decode()})}\n\n"
            elif kind == "error":
                yield f"data: {json.dumps({'type': 'error', 'error': {'message': payload}})}\n\n"
            elif kind == "done":
                n_in = payload.num_text_tokens
                done = {"type": "speech.audio.done",
                        "usage": {"input_tokens": n_in, "output_tokens": payload.frames,
                                  "total_tokens": n_in + payload.frames},
                        "stop_reason": payload.stop_reason, "seed": payload.seed,
                        "audio_seconds": payload.audio_seconds}
                yield f"data: {json.dumps(done)}\n\n"

    # Endpoints -----------------------------------------------------------------------------------------------------

    @app.exception_handler(BadRequest)
    async def bad_request_handler(request: Request, exc: BadRequest):
        return error(exc.status, exc.message, exc.param)

    @app.get("/health")
    async def health():
        alive, reason = worker.health()
        body = {"status": "ok" if alive else "unavailable", "reason": reason, "model": model_name,
                "model_type": synth.config.model_type, "sample_rate": sample_rate,
                "active_streams": worker.active_count, "queue_depth": worker.waiting_count}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def get_metrics(request: Request):
        if not authorized(request.headers):
            return unauthorized()
        metrics.frames_per_second.set(worker.frames_per_second())
        worker.update_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(voices_router(synth, model_name=model_name, authorized=authorized,
                                     unauthorized=unauthorized, error=error))

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
        return StreamingResponse(pcm_body(job, False), media_type="application/octet-stream",
                                 headers=audio_headers(job))

    @app.post("/v1/audio/speech")
    async def openai_speech(request: Request):
        metrics.requests_total.labels(endpoint="openai_speech").inc()
        if not authorized(request.headers):
            return unauthorized()
        params, response_format, stream_format = validator.openai_speech(await read_json(request))
        engine_request = validator.prepare(params, "input")
        try:
            job = submit_text_job(params, engine_request, "openai_speech")
        except (QueueFull, EngineUnavailable):
            return busy()
        wav = response_format == "wav"
        if stream_format == "sse":
            return StreamingResponse(sse_body(job, wav), media_type="text/event-stream", headers=audio_headers(job))
        return StreamingResponse(pcm_body(job, wav), media_type="audio/wav" if wav else "audio/pcm",
                                 headers=audio_headers(job))

    @app.websocket(WS_PATH)
    async def ws_speech(websocket: WebSocket):
        metrics.requests_total.labels(endpoint="ws").inc()
        if not authorized(websocket.headers, websocket.query_params):
            metrics.errors_total.labels(kind="unauthorized").inc()
            await websocket.close(code=1008, reason="missing or wrong API key")
            return
        await websocket.accept()
        await WsSession(websocket, synth, worker, validator, metrics, settings).run()

    return app


class WsContext:
    def __init__(self, context_id: str, job: LiveJob):
        self.id = context_id
        self.job = job
        self.cancelled = False
        self.chars = 0
        self.flushed = False
        self.pump: asyncio.Task | None = None


class WsSession:
    """One WebSocket connection: several contexts, each a LiveJob on the engine worker."""

    def __init__(self, ws: WebSocket, synth: Synthesizer, worker: EngineWorker, validator: Validator,
                 metrics: ServerMetrics, settings: ServerSettings):
        self.ws, self.synth, self.worker, self.validator = ws, synth, worker, validator
        self.metrics, self.settings = metrics, settings
        self.contexts: dict[str, WsContext] = {}
        self.send_lock = asyncio.Lock()
        self.closed = False

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

    async def error(self, context_id: str | None, message: str) -> None:
        self.metrics.errors_total.labels(kind="ws_protocol").inc()
        await self.send_json({"type": "error", "context_id": context_id, "message": message})

    async def run(self) -> None:
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
                    await self.error(getattr(exc, "context_id", None), exc.message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.closed = True
            for ctx in list(self.contexts.values()):
                ctx.job.cancel()
                if ctx.pump is not None:
                    ctx.pump.cancel()

    async def handle(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except json.JSONDecodeError as exc:
            await self.error(None, f"message is not valid JSON: {exc}")
            return
        if not isinstance(msg, dict):
            await self.error(None, "a message must be a JSON object with a 'type'")
            return
        kind = msg.get("type")
        cid = msg.get("context_id")
        if kind not in ("config", "text", "flush", "cancel"):
            await self.error(cid if isinstance(cid, str) else None,
                             f"unknown message type {kind!r}; expected config, text, flush or cancel")
            return
        if not isinstance(cid, str) or not cid or len(cid.encode()) > 255:
            await self.error(None, "'context_id' must be a non-empty string of at most 255 bytes")
            return
        ctx = self.contexts.get(cid)
        if kind == "config":
            if ctx is not None:
                await self.error(cid, f"context {cid!r} already exists; config must be its first message")
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
                await self.error(cid, f"context {cid!r} was flushed; start a new context for more text")
                return
            if ctx.chars + len(delta) > self.settings.max_text_chars:
                await self.error(cid, f"'text' of context {cid!r} would exceed {self.settings.max_text_chars} "
                                      "characters; the delta was dropped")
                return
            ctx.chars += len(delta)
            ctx.job.add_text(delta)
        elif kind == "flush":
            if ctx is None:
                await self.error(cid, f"unknown context {cid!r}")
                return
            ctx.flushed = True
            ctx.job.request_flush()
        elif kind == "cancel":
            if ctx is None:
                return  # already finished (or never existed): nothing to stop
            ctx.cancelled = True
            ctx.job.cancel()

    async def open_context(self, cid: str, msg: dict) -> WsContext | None:
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
        try:
            self.worker.submit(job)
        except (QueueFull, EngineUnavailable):
            self.metrics.errors_total.labels(kind="queue_full").inc()
            await self.send_json({"type": "error", "context_id": cid,
                                  "message": "the server is at capacity; retry this context shortly"})
            return None
        ctx = WsContext(cid, job)
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
                                      "sample_rate": self.synth.sample_rate, "encoding": "pcm_s16le",
                                      "channels": 1})

        try:
            while True:
                kind, payload = await ctx.job.next_event()
                if kind == "chunk":
                    if ctx.cancelled:
                        continue
                    await start()
                    await self.send_bytes(tag + payload.pcm.astype("<i2").tobytes())
                elif kind == "error":
                    await self.error(ctx.id, payload)
                elif kind == "done":
                    await start()
                    info = asdict(payload)
                    reason = "cancelled" if ctx.cancelled else info["stop_reason"]
                    await self.send_json({"type": "audio_done", "context_id": ctx.id, "stop_reason": reason,
                                          "frames": info["frames"],
                                          "audio_seconds": round(info["audio_seconds"], 4),
                                          "time_to_first_audio_ms": None if info["time_to_first_audio_ms"] is None
                                          else round(info["time_to_first_audio_ms"], 2),
                                          "elapsed_ms": round(info["elapsed_ms"], 2), "seed": info["seed"]})
                    break
        except Exception:  # noqa: BLE001 - socket gone
            ctx.job.cancel()
        finally:
            if self.contexts.get(ctx.id) is ctx:
                del self.contexts[ctx.id]


# ---------------------------------------------------------------------------------------------------------------
# `qwen-tts-mk serve`


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def run_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("qwen-tts-mk serve: error: the server needs its extra: pip install 'qwen-tts-megakernel[server]'",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = getattr(args, "api_key", None) or os.environ.get("QWEN_TTS_MK_API_KEY") or None
    host, port = args.host, args.port
    if not _is_loopback(host) and not api_key:
        log.warning("binding %s without --api-key: anyone who can reach this port can use the server", host)
    settings = ServerSettings()
    for name in ("max_active", "max_queue", "max_text_chars"):
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))
    print(f"loading {args.model} ({args.backend} backend)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    synth = Synthesizer.from_pretrained(args.model, backend=args.backend, device=args.device,
                                        dtype=getattr(args, "dtype", None), max_streams=settings.max_active)
    print(f"loaded in {time.perf_counter() - start:.1f} s; serving on http://{host}:{port} "
          f"(WebSocket ws://{host}:{port}{WS_PATH})", file=sys.stderr, flush=True)
    app = create_app(synth, model_name=args.model, api_key=api_key, settings=settings)
    uvicorn.run(app, host=host, port=port, log_level="info", ws="websockets-sansio")
    return 0
