"""The server's side of the engine: asyncio handles for engine jobs, and the engine's metrics.

The engine (engine/scheduler.py) owns scheduling; this module only adapts it to asyncio. A ServerJob wraps one
engine Job: the engine's events arrive on an asyncio.Queue through `loop.call_soon_threadsafe`, and taking a chunk
off that queue is what releases the engine's backpressure. Events: ("chunk", AudioChunk), ("done", JobInfo),
("error", message).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from ..engine import DEFAULT_CHUNK_SCHEDULE, EngineFull, Job, PromptSource, Request, Synthesizer
from ..live import LiveUtterance

log = logging.getLogger("qwen_tts_megakernel.server")

QueueFull = EngineFull  # every slot and queue place taken: the server answers 503 with Retry-After

_JOB_IDS = itertools.count(1)


class ServerJob:
    """One stream of one request (HTTP) or context (WebSocket), consumed from the event loop."""

    def __init__(self, synth: Synthesizer, loop: asyncio.AbstractEventLoop, source, *, endpoint: str,
                 chunk_schedule: tuple[int, ...] = DEFAULT_CHUNK_SCHEDULE, max_buffered_chunks: int = 64):
        self.synth, self.loop, self.endpoint = synth, loop, endpoint
        self.id = next(_JOB_IDS)  # the stream's number in the server's log lines
        self.events: asyncio.Queue = asyncio.Queue()
        self.job = Job(source, self._emit, label=endpoint, chunk_schedule=chunk_schedule, audio=True,
                       max_buffered=max_buffered_chunks)

    def _emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    async def next_event(self):
        event = await self.events.get()
        if event[0] == "chunk":
            self.job.taken()
        return event

    def cancel(self) -> None:
        self.job.cancel()

    def seed(self) -> int:
        return self.job.source.seed

    @property
    def finished(self) -> bool:
        return self.job.finished

    @property
    def started(self) -> float | None:
        """When the engine opened the stream (None while it waits for a slot or for its text)."""
        return self.job.started



class TextJob(ServerJob):
    """Whole text known up front."""

    def __init__(self, synth: Synthesizer, loop, *, request: Request, seed: int, endpoint: str, **kw):
        super().__init__(synth, loop, PromptSource(request, seed), endpoint=endpoint, **kw)


class LiveJob(ServerJob):
    """Streamed text (WebSocket contexts): text arrives in deltas, speech starts before the text is complete."""

    def __init__(self, synth: Synthesizer, loop, *, utterance: LiveUtterance, endpoint: str, **kw):
        super().__init__(synth, loop, utterance, endpoint=endpoint, **kw)
        self.utterance = utterance

    def add_text(self, text: str) -> None:
        self.utterance.add_text(text)
        self.job.wake()

    def request_flush(self) -> None:
        self.utterance.request_flush()
        self.job.wake()


class MetricsObserver:
    """The engine's observer hooks -> the server's Prometheus metrics."""

    def __init__(self, metrics):
        self.metrics = metrics

    def first_chunk(self, job, seconds: float) -> None:
        self.metrics.observe_first_chunk(job.label, seconds)

    def done(self, job, info, compute_s: float) -> None:
        self.metrics.observe_done(job, info, compute_s)

    def frames(self, count: int) -> None:
        self.metrics.frames_total.inc(count)

    def failed(self, job, message: str) -> None:
        self.metrics.errors_total.labels(kind="stream_failed").inc()


class EngineWorker:
    """The server's view of the synthesizer's engine: submit jobs, health, load figures."""

    def __init__(self, synth: Synthesizer, metrics, *, max_active: int = 16, max_queue: int = 32,
                 consumer_stall_s: float = 10.0, queue_timeout_s: float = 30.0, text_wait_s: float = 0.0):
        self.synth = synth
        self.metrics = metrics
        settings = synth.engine_settings
        settings.max_active, settings.max_queue = max_active, max_queue
        settings.consumer_stall_s = consumer_stall_s
        # The server answers a request that waited queue_timeout_s itself (503 before the 200, or a WS error); the
        # engine's own limit is a backstop behind it. It counts from a job's creation, and a WS context's job is
        # created when the context opens but submitted only when it has something to speak, up to text_wait_s later.
        settings.queue_timeout_s = 2 * queue_timeout_s + text_wait_s
        self.engine = synth.engine
        self.engine.observer = MetricsObserver(metrics)

    def start(self) -> None:
        self.engine.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.engine.stop(timeout)

    def health(self) -> tuple[bool, str]:
        return self.engine.health()

    @property
    def alive(self) -> bool:
        return self.engine.health()[0]

    @property
    def active_count(self) -> int:
        return self.engine.active_count

    @property
    def waiting_count(self) -> int:
        return self.engine.waiting_count

    def submit(self, job: ServerJob) -> None:
        """Raises QueueFull (503) or EngineUnavailable."""
        self.engine.submit(job.job)

    def frames_per_second(self) -> float:
        return self.engine.frames_per_second()

    def step_totals(self) -> dict:
        """The engine's step split so far (engine/step_profile.py), for /health and `bench --load`."""
        return self.engine.step_profile.totals()

    def update_gauges(self) -> None:
        self.metrics.active_streams.set(self.engine.active_count)
        self.metrics.queue_depth.set(self.engine.waiting_count)
