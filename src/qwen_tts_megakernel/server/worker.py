"""The engine worker: one thread owns the model and interleaves every active stream frame by frame.

Requests become Jobs. A Job is admitted into a bounded queue (EngineWorker.submit raises QueueFull when
`max_active + max_queue` jobs are already held: the server answers 503 with Retry-After). Up to `max_active`
jobs are active; each round of the worker loop generates one frame for every active job that can make progress,
so a long utterance never delays another stream's first chunk by more than one frame per active stream.

A job makes no progress (and costs nothing) while
  * its consumer has not taken `max_buffered_chunks` chunks yet (backpressure from a slow client), or
  * it is a live (streamed text) job waiting for its next text token.

Events go back to the asyncio side through `loop.call_soon_threadsafe` into the job's asyncio.Queue:
  ("chunk", AudioChunk)  ("done", info dict)  ("error", message)
Cancellation (client disconnect, WS cancel) sets job.cancel_event; the worker ends the job before its next frame
and frees its backend stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..codec import StreamingCodecDecoder
from ..engine import DEFAULT_CHUNK_SCHEDULE, AudioChunk, Request, Synthesizer, float_to_pcm16
from ..live import LiveUtterance

log = logging.getLogger("qwen_tts_megakernel.server")


class QueueFull(Exception):
    """The worker holds as many jobs as it may; try again later."""


@dataclass
class JobInfo:
    """What the worker reports when a job ends."""

    stop_reason: str
    frames: int
    audio_seconds: float
    time_to_first_audio_ms: float | None
    elapsed_ms: float
    seed: int
    num_text_tokens: int


class Job:
    """One utterance: a frame source (whole text or live text) plus the chunk schedule and codec decoder."""

    def __init__(self, synth: Synthesizer, loop: asyncio.AbstractEventLoop, *, endpoint: str,
                 chunk_schedule: tuple[int, ...] = DEFAULT_CHUNK_SCHEDULE, max_buffered_chunks: int = 64):
        self.synth = synth
        self.loop = loop
        self.endpoint = endpoint
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.schedule = chunk_schedule
        self.max_buffered_chunks = max_buffered_chunks
        self.created = time.perf_counter()
        self.started: float | None = None
        self.first_audio: float | None = None
        self.frames = 0
        self.samples = 0
        self.finished = False
        self._pending: list[np.ndarray] = []
        self._chunks_sent = 0
        self._outstanding = 0  # chunks emitted and not yet taken by the consumer
        self._lock = threading.Lock()
        self._decoder: StreamingCodecDecoder | None = None
        self._prime_codes: np.ndarray | None = None  # in-context cloned voice: the decoder continues from these
        self.worker: "EngineWorker | None" = None

    # Consumer side (event loop) ------------------------------------------------------------------------------------

    async def next_event(self):
        event = await self.events.get()
        if event[0] == "chunk":
            with self._lock:
                self._outstanding -= 1
            if self.worker is not None:
                self.worker.wake()
        return event

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.worker is not None:
            self.worker.wake()

    # Worker side ---------------------------------------------------------------------------------------------------

    def _emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def ready(self) -> bool:
        if self.finished:
            return False
        if self.cancel_event.is_set():
            return True
        with self._lock:
            if self._outstanding >= self.max_buffered_chunks:
                return False
        return self._source_ready()

    def _source_ready(self) -> bool:
        return True

    def _next_codes(self) -> np.ndarray | None:
        raise NotImplementedError

    def _stop_reason(self) -> str:
        raise NotImplementedError

    def _close_source(self) -> None:
        raise NotImplementedError

    def seed(self) -> int:
        raise NotImplementedError

    def num_text_tokens(self) -> int:
        return 0

    def step(self) -> bool:
        """Generate at most one frame; emit a chunk when the schedule says so. Returns True when the job ended."""
        if self.started is None:
            self.started = time.perf_counter()
        if self.cancel_event.is_set():
            self._finish("cancelled")
            return True
        codes = self._next_codes()
        if codes is None:
            if self._pending:
                self._flush_chunk()
            self._finish(self._stop_reason())
            return True
        self.frames += 1
        self._pending.append(codes)
        if len(self._pending) >= self.schedule[min(self._chunks_sent, len(self.schedule) - 1)]:
            self._flush_chunk()
        return False

    def _flush_chunk(self) -> None:
        # The same decode as Synthesizer._chunks, so the bytes equal the in-process stream's.
        if self._decoder is None:
            self._decoder = StreamingCodecDecoder(self.synth.codec)
            if self._prime_codes is not None:
                self._decoder.push(torch.from_numpy(self._prime_codes).to(self.synth.codec_device))
        codes = torch.from_numpy(np.stack(self._pending)).to(self.synth.codec_device)
        audio = self._decoder.push(codes).float().cpu().numpy()
        now = time.perf_counter()
        chunk = AudioChunk(pcm=float_to_pcm16(audio), sample_rate=self.synth.sample_rate,
                           first_frame=self.frames - len(self._pending), num_frames=len(self._pending),
                           time_s=now - self.created)
        self._pending.clear()
        self._chunks_sent += 1
        if self.first_audio is None:
            self.first_audio = now
            if self.worker is not None:
                self.worker.metrics.observe_first_chunk(self.endpoint, now - self.created)
        self.samples += len(chunk.pcm)
        with self._lock:
            self._outstanding += 1
        self._emit(("chunk", chunk))

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self._close_source()
        except Exception:  # noqa: BLE001 - closing must never take the worker down
            log.exception("closing a stream failed")
        self._decoder = None
        now = time.perf_counter()
        info = JobInfo(stop_reason=reason, frames=self.frames, audio_seconds=self.samples / self.synth.sample_rate,
                       time_to_first_audio_ms=None if self.first_audio is None
                       else 1000 * (self.first_audio - self.created),
                       elapsed_ms=1000 * (now - self.created), seed=self.seed(),
                       num_text_tokens=self.num_text_tokens())
        if self.worker is not None:
            self.worker.metrics.observe_done(self, info, compute_s=now - (self.started or now))
        log.info("%s stream done: %s, %d frames, %.2f s audio, first audio %s ms, %.0f ms", self.endpoint, reason,
                 info.frames, info.audio_seconds,
                 "-" if info.time_to_first_audio_ms is None else f"{info.time_to_first_audio_ms:.0f}",
                 info.elapsed_ms)
        self._emit(("done", info))

    def fail(self, message: str) -> None:
        if self.finished:
            return
        self._emit(("error", message))
        self._finish("error")


class TextJob(Job):
    """Whole text known up front: drives the engine's own per-frame generator."""

    def __init__(self, synth: Synthesizer, loop, *, request: Request, seed: int, endpoint: str, **kw):
        super().__init__(synth, loop, endpoint=endpoint, **kw)
        self._seed = seed
        self._report: dict = {}
        self._frames = synth.frames(request, seed=seed, report=self._report)
        self._prime_codes = request.prompt.ref_codes

    def _next_codes(self):
        try:
            return next(self._frames)
        except StopIteration:
            return None

    def _stop_reason(self) -> str:
        return self._report.get("stop_reason", "cancelled")

    def _close_source(self) -> None:
        self._frames.close()

    def seed(self) -> int:
        return self._seed

    def num_text_tokens(self) -> int:
        return self._report.get("num_text_tokens", 0)


class LiveJob(Job):
    """Streamed text (WebSocket contexts): text arrives in deltas, speech starts before the text is complete."""

    def __init__(self, synth: Synthesizer, loop, *, utterance: LiveUtterance, endpoint: str, **kw):
        super().__init__(synth, loop, endpoint=endpoint, **kw)
        self.utterance = utterance
        self._prime_codes = utterance.prime_codes
        self._text_lock = threading.Lock()
        self._inbox: list[str] = []
        self._flush_requested = False
        self.empty_error = False

    # Called from the event loop.
    def add_text(self, text: str) -> None:
        with self._text_lock:
            self._inbox.append(text)
        if self.worker is not None:
            self.worker.wake()

    def request_flush(self) -> None:
        with self._text_lock:
            self._flush_requested = True
        if self.worker is not None:
            self.worker.wake()

    # Worker side: text is tokenized on the worker thread, which owns the utterance.
    def _drain_inbox(self) -> None:
        with self._text_lock:
            inbox, self._inbox = self._inbox, []
            flush = self._flush_requested
        if inbox:
            self.utterance.append("".join(inbox))
        if flush:
            self.utterance.flush()

    def _source_ready(self) -> bool:
        self._drain_inbox()
        if self.utterance.empty:
            return True  # step() reports it
        return self.utterance.ready()

    def step(self) -> bool:
        if not self.cancel_event.is_set() and self.utterance.empty:
            self.fail("text is empty: nothing to speak")
            return True
        return super().step()

    def _next_codes(self):
        return self.utterance.next_frame()

    def _stop_reason(self) -> str:
        return self.utterance.stop_reason or "cancelled"

    def _close_source(self) -> None:
        self.utterance.cancel()

    def seed(self) -> int:
        return self.utterance.seed

    def num_text_tokens(self) -> int:
        return len(self.utterance.tokens)


class EngineWorker:
    """The single thread that owns the Synthesizer."""

    def __init__(self, synth: Synthesizer, metrics, *, max_active: int = 16, max_queue: int = 32):
        self.synth = synth
        self.metrics = metrics
        self.max_active = max_active
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tts-engine-worker", daemon=True)
        self._frame_times: collections.deque[float] = collections.deque()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, job: Job) -> None:
        with self._cond:
            held = len(self._waiting) + len(self._active)
            if held >= self.max_active + self.max_queue:
                raise QueueFull(f"{held} streams in progress or queued")
            job.worker = self
            self._waiting.append(job)
            self._update_gauges()
            self._cond.notify_all()

    def _update_gauges(self) -> None:
        self.metrics.active_streams.set(len(self._active))
        self.metrics.queue_depth.set(len(self._waiting))

    def frames_per_second(self) -> float:
        now = time.perf_counter()
        while self._frame_times and now - self._frame_times[0] > 5.0:
            self._frame_times.popleft()
        return len(self._frame_times) / 5.0

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(self._waiting.popleft())
                # Jobs cancelled while still waiting end without ever touching the model.
                for job in [j for j in self._waiting if j.cancel_event.is_set()]:
                    self._waiting.remove(job)
                    job._finish("cancelled")
                self._update_gauges()
                if self._stop:
                    break
                # Streams still waiting for their first audio go first: a newcomer's first chunk never waits
                # behind a whole round of long-running streams.
                ready = sorted((j for j in self._active if j.ready()), key=lambda j: j.first_audio is not None)
                if not ready:
                    self._cond.wait(timeout=0.25)
                    continue
            ended = []
            for job in ready:
                try:
                    frames_before = job.frames
                    if job.step():
                        ended.append(job)
                    if job.frames > frames_before:
                        self._frame_times.append(time.perf_counter())
                        self.metrics.frames_total.inc()
                except Exception as exc:  # noqa: BLE001 - one bad stream must not stop the others
                    log.exception("stream failed")
                    self.metrics.errors_total.labels(kind="internal").inc()
                    job.fail(f"internal error: {type(exc).__name__}: {exc}")
                    ended.append(job)
            if ended:
                with self._cond:
                    self._active = [j for j in self._active if j not in ended]
                    self._update_gauges()
        for job in list(self._active) + list(self._waiting):
            job._finish("cancelled")
