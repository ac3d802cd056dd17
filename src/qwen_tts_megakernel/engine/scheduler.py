"""The engine: one scheduler thread owns the backend and the codec and carries every stream (continuous batching).

Each engine step, at a frame boundary:
  1. cancelled jobs end (their backend and codec state freed); a job whose consumer stopped taking events for
     `consumer_stall_s` while its buffer is full ends with an error; jobs queued past `queue_timeout_s` fail;
  2. waiting jobs are admitted while slots are free and the step model (engine/step_model.py) says every admitted
     stream stays ahead of real time (admission control; `max_active` caps it);
  3. admitted jobs whose text is ready are opened together: one batched prefill (`backend.open`), bounded by
     `max_prefill_rows` per step so the running streams keep real time;
  4. live-text jobs hand the backend the text rows that arrived;
  5. ONE backend step is launched for the next frame of every job that can make progress (not backpressured,
     its next text token present, under its frame limit), and while it runs
  6. ONE codec push decodes the pending frames of every job whose chunk is due (first chunk = 1 frame, then the
     job's chunk schedule) on the codec's own CUDA stream (engine/pipeline.py);
  7. the step's frames come back; a job's first frame is decoded at once (its first chunk waits for no later
     step), and the chunks go out through the courier thread (engine/delivery.py);
  8. jobs that ended (their last chunk sent) send ("done", info).
Everything done for one job runs under that job's own error handling: a failure ends that job with ("error",
message) and never the others. A BackendError (the backend as a whole broke) fails every open job, then the engine
rebuilds the backend with `backend_factory` if it has one; if that fails too, `health()` reports why and submit()
refuses new work.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from ..backends.base import Backend, BackendError
from ..config import ModelConfig
from ..model import PromptEmbedder
from .delivery import Courier
from .jobs import Job, JobInfo, AudioChunk, float_to_pcm16
from .pipeline import CodecLane, Decoding, StepInFlight
from .step_model import HOLD, PROBE, StepModel
from .step_profile import StepProfile
from .warmup import warm_batches, warm_up

log = logging.getLogger("qwen_tts_megakernel.engine")

FRAME_SECONDS = 0.08


def _mark_sent(job: Job) -> None:
    """Posted after a job's first chunk: the event thread has handed that chunk to the consumer."""
    job.marks["first_sent"] = time.perf_counter()


class EngineFull(Exception):
    """Every stream slot and queue place is taken; try again later (the server answers 503 with Retry-After)."""


class EngineUnavailable(Exception):
    """The engine cannot take work (its backend broke and could not be rebuilt, or it was stopped)."""


@dataclass
class EngineSettings:
    max_active: int = 64  # streams stepped together (also capped by the backend's slots)
    max_queue: int = 64  # streams waiting for a slot; beyond that submit() raises EngineFull
    queue_timeout_s: float = 30.0  # a job waiting longer for a slot fails
    consumer_stall_s: float = 10.0  # a job whose consumer took nothing for this long with a full buffer fails
    max_buffered: int = 64  # events a job may have outstanding before it pauses (backpressure)
    realtime_admission: bool = True  # hold new streams back while the step model says they would fall
    realtime_headroom: float = 0.8  # behind real time: admit while the predicted step stays under 0.8 x 80 ms
    max_prefill_rows: int = 4096  # prompt rows opened per engine step
    warm_up: bool = False  # step batch sizes 1, 2, 4, ... at start-up (Synthesizer: on for CUDA devices)
    # Every N steps log the step-time table and the active / waiting stream counts (0: never).
    step_log_every: int = field(default_factory=lambda: _env_int(STEP_LOG_ENV, 0))
    # Pipelined step (engine/pipeline.py): launch frame t+1 before decoding frame t, the codec on its own CUDA
    # stream. Off by default until it has run on a GPU (README, Status); $QWEN_TTS_MK_PIPELINE=1 turns it on.
    pipelined: bool = field(default_factory=lambda: _env_int(PIPELINE_ENV, 0) == 1)


STEP_LOG_ENV = "QWEN_TTS_MK_STEP_LOG"
PIPELINE_ENV = "QWEN_TTS_MK_PIPELINE"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"${name} must be a non-negative integer, got {value[:40]!r}")
    return int(value)


class EngineObserver(Protocol):
    def first_chunk(self, job: Job, seconds: float) -> None: ...
    def done(self, job: Job, info: JobInfo, compute_s: float) -> None: ...
    def frames(self, count: int) -> None: ...
    def failed(self, job: Job, message: str) -> None: ...


class _NoObserver:
    def first_chunk(self, job, seconds): pass
    def done(self, job, info, compute_s): pass
    def frames(self, count): pass
    def failed(self, job, message): pass


class FrameRate:
    """Frames per second over the last `window_s` seconds, in fixed memory: one counter per whole second."""

    def __init__(self, window_s: int = 5):
        self.window_s = window_s
        self._counts = [0] * (window_s + 1)
        self._seconds = [-1] * (window_s + 1)
        self._lock = threading.Lock()

    def add(self, count: int = 1, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        slot = second % len(self._counts)
        with self._lock:
            if self._seconds[slot] != second:
                self._seconds[slot], self._counts[slot] = second, 0
            self._counts[slot] += count

    def rate(self, now: float | None = None) -> float:
        """Frames counted in the last `window_s` whole seconds before the current one, per second."""
        second = int(time.monotonic() if now is None else now)
        with self._lock:
            total = sum(c for c, s in zip(self._counts, self._seconds) if second - self.window_s <= s < second)
        return total / self.window_s


class Engine:
    """Owns the GPU: submit() jobs from any thread; the scheduler thread does all model work."""

    def __init__(self, backend: Backend, codec, embedder: PromptEmbedder, config: ModelConfig, *,
                 sample_rate: int, settings: EngineSettings | None = None,
                 backend_factory: Callable[[], Backend] | None = None, step_model: StepModel | None = None):
        self.backend, self.codec, self.embedder, self.config = backend, codec, embedder, config
        self.settings = settings or EngineSettings()
        self.lane = CodecLane(codec, overlap=self.settings.pipelined)  # the codec beside the backend's step
        self.courier = Courier()  # events reach their consumers off the scheduler thread
        self.step_profile = StepProfile()  # where step time goes: GPU waits, prefill, host work
        self._stepped_at: float | None = None  # when the previous step ended, while steps follow each other
        self.sample_rate = sample_rate
        self.backend_factory = backend_factory
        self.observer: EngineObserver = _NoObserver()
        self.step_times = step_model or StepModel()  # what admission predicts from; its clock times the steps
        self._steps = 0
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._unhealthy: str | None = None
        self.frame_rate = FrameRate(5)
        self.eos_id = config.ids.codec_eos

    # Control (any thread) --------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self.courier.start()
                self._thread = threading.Thread(target=self._run, name="tts-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.courier.stop(timeout)  # after the scheduler's last events: it delivers them, then ends

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def health(self) -> tuple[bool, str]:
        """(True, "ok") or (False, why the engine cannot serve)."""
        if self._unhealthy is not None:
            return False, self._unhealthy
        if self._thread is None or not self._thread.is_alive():
            return False, "the engine thread is not running"
        return True, "ok"

    def submit(self, job: Job) -> None:
        """Queue a job (it starts at the next frame boundary). Raises EngineFull or EngineUnavailable."""
        ok, why = self.health()
        if not ok:
            raise EngineUnavailable(why)
        with self._cond:
            held = len(self._waiting) + len(self._active)
            if held >= self.settings.max_active + self.settings.max_queue:
                raise EngineFull(f"{held} streams in progress or queued")
            job.wake = self.wake
            job.post = self.courier.post
            job.max_buffered = min(job.max_buffered, self.settings.max_buffered)
            self._waiting.append(job)
            self._cond.notify_all()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def frames_per_second(self) -> float:
        return self.frame_rate.rate()

    # The scheduler thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self._cond:
                    if self._stop:
                        break
                    self._admit()
                    jobs = list(self._active)
                progressed = self._step(jobs) if jobs else False
                with self._cond:
                    self._active = [j for j in self._active if not j.finished]
                    if not progressed and not self._stop:
                        self._cond.wait(timeout=0.05)
        except Exception as exc:  # noqa: BLE001 - a bug in the scheduler itself: report it, fail everyone
            log.exception("the engine scheduler stopped")
            self._unhealthy = f"the engine scheduler stopped: {type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                jobs = list(self._active) + list(self._waiting)
                self._active, self._waiting = [], collections.deque()
            for job in jobs:
                self._finish(job, "cancelled" if self._unhealthy is None else "error",
                             None if self._unhealthy is None else self._unhealthy)

    def _admit(self) -> None:
        """Under the lock: drop cancelled or expired waiting jobs, move waiting jobs into the active set."""
        s, now = self.settings, time.perf_counter()
        for job in list(self._waiting):
            if job.cancel_event.is_set():
                self._waiting.remove(job)
                self._finish(job, "cancelled")
            elif now - job.created > s.queue_timeout_s:
                self._waiting.remove(job)
                self._finish(job, "error", f"waited {s.queue_timeout_s:g} s for a free stream slot")
        limit = min(s.max_active, self.backend.max_streams)
        probed = False
        while self._waiting and len(self._active) < limit:
            if s.realtime_admission and self._active:
                # What admission protects: the running streams' real time. A step of every admitted stream must
                # stay under the headroom x one frame; where no measurement can tell, one stream is admitted per
                # step to measure (a probe).
                verdict = self.step_times.verdict(len(self._active) + 1, s.realtime_headroom * FRAME_SECONDS)
                if verdict == HOLD or (verdict == PROBE and probed):
                    break
                probed |= verdict == PROBE
            self._active.append(self._waiting.popleft())

    def warm_up(self, make_spec) -> dict:
        """Before start(): step batch sizes 1, 2, 4, ... max_active (engine/warmup.py) with throw-away streams
        built by `make_spec(i)`, recording the step times for admission; logs and returns what it cost."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("warm_up() runs before the engine thread starts")
        batches = warm_batches(min(self.settings.max_active, self.backend.max_streams))
        with torch.no_grad():
            report = warm_up(self.backend, make_spec, batches, self.eos_id, record=self.step_times.record,
                             clock=self.step_times.clock)
        log.info("warm-up: batch sizes %s stepped in %.2f s (last step ms by size: %s)", report["batches"],
                 report["seconds"], report["step_ms"])
        return report

    def _log_steps(self, batch: int) -> None:
        """Every `step_log_every` steps: the step-time table and the stream counts (a load run's diagnosis)."""
        self._steps += 1
        every = self.settings.step_log_every
        if every and self._steps % every == 0:
            log.info("step %d: batch %d, active %d, waiting %d, step model %s", self._steps, batch,
                     len(self._active), len(self._waiting), self.step_times.table())

    def _step(self, jobs: list[Job]) -> bool:
        """One engine step over the active jobs, as a pipeline: frame t+1's backend step is launched first, frame
        t's chunks are decoded on the codec's stream beside it, then the step's result comes back; a stream's first
        chunk is decoded as soon as its first frame exists. Returns whether anything happened."""
        started = time.perf_counter()
        progressed = self._end_cancelled_and_stalled(jobs)
        jobs = [j for j in jobs if not j.finished]
        progressed |= self._open_ready(jobs)
        opened = time.perf_counter()
        self._feed_text(jobs)
        stepping = [j for j in jobs if self._can_step(j)]
        step_clock = self.step_times.clock()  # admission's clock (injected in tests)
        launched = self._launch(stepping) if stepping else None
        due = [j for j in jobs if self._chunk_due(j)]
        decoding = self.lane.decode(due) if due else None
        gpu_wait = 0.0
        if launched is not None:
            self._collect(stepping, launched)
            gpu_wait += launched.wait_s
        in_lane = set(map(id, due))
        first = [j for j in stepping if j.chunks_sent == 0 and id(j) not in in_lane and self._chunk_due(j)]
        first_decoding = self.lane.decode(first) if first else None
        for d in (decoding, first_decoding):
            if d is not None:
                self._deliver(d)
                gpu_wait += d.wait_s
        now = time.perf_counter()
        if stepping:  # the step's wall time, codec included: what admission control predicts from
            self.step_times.record(len(stepping), self.step_times.clock() - step_clock)
            self._log_steps(len(stepping))
            since = self._stepped_at if self._stepped_at is not None else started
            self.step_profile.record(len(stepping), now - since, gpu_wait, opened - started)
        self._stepped_at = now if stepping else None
        progressed |= bool(stepping or due)
        for job in jobs:
            if not job.finished and job.end_reason is not None and not (job.audio and job.pending):
                self._finish(job, job.end_reason)
                progressed = True
        return progressed

    @staticmethod
    def _chunk_due(job: Job) -> bool:
        return not job.finished and job.audio and job.codec_handle is not None and job.chunk_due()

    def _end_cancelled_and_stalled(self, jobs: list[Job]) -> bool:
        ended = False
        now = time.perf_counter()
        for job in jobs:
            if job.cancel_event.is_set():
                self._finish(job, "cancelled")
                ended = True
            elif (job.outstanding >= job.max_buffered
                  and now - job.last_taken > self.settings.consumer_stall_s):
                self._finish(job, "error", f"the client took no audio for {self.settings.consumer_stall_s:g} s")
                ended = True
        return ended

    def _open_ready(self, jobs: list[Job]) -> bool:
        """Prefill the jobs whose text is ready, batched, within the step's row budget."""
        specs, opening, rows = [], [], 0
        for job in jobs:
            if job.handle is not None or job.end_reason is not None:
                continue
            try:
                job.source.prepare()
                if job.source.empty:
                    raise ValueError("text is empty: nothing to speak")
                if not job.source.ready_to_open():
                    continue
                spec = job.source.spec(self.embedder, self.config)
            except Exception as exc:  # noqa: BLE001 - this job's text or prompt is bad: end it alone
                self._fail(job, exc)
                continue
            if opening and rows + len(spec.prefill) > self.settings.max_prefill_rows:
                break
            specs.append(spec)
            opening.append(job)
            rows += len(spec.prefill)
        if not opening:
            return False
        open_start = time.perf_counter()
        for job in opening:
            job.marks["open_start"] = open_start
        try:
            handles = self.backend.open(specs)
        except BackendError as exc:
            self._backend_broke(exc)
            return True
        except Exception:  # noqa: BLE001 - open one by one, so one bad spec fails only its own job
            handles = []
            for job, spec in zip(opening, specs):
                try:
                    handles.extend(self.backend.open([spec]))
                except BackendError as exc:
                    self._backend_broke(exc)
                    return True
                except Exception as exc:  # noqa: BLE001
                    handles.append(None)
                    self._fail(job, exc)
        for job, spec, handle in zip(opening, specs, handles):
            if handle is None:
                continue
            job.handle = handle
            # The KV cache bounds the frames: the prompt's rows and one position per frame (frame 0 reuses the
            # last prompt row's position).
            job.max_frames = min(spec.max_frames, self.backend.max_seq_len - len(spec.prefill) + 1)
            job.started = job.marks["opened"] = time.perf_counter()
            if job.audio:
                try:
                    job.codec_handle = self.lane.open(getattr(job.source, "prime_codes", None))
                except Exception as exc:  # noqa: BLE001
                    self._fail(job, exc)
        return True

    def _feed_text(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.handle is None or job.finished:
                continue
            try:
                job.source.prepare()
                rows, end = job.source.text_update(self.embedder)
                if rows is not None and len(rows):
                    self.backend.append_text(job.handle, rows)
                if end:
                    self.backend.end_text(job.handle)
            except BackendError as exc:
                self._backend_broke(exc)
                return
            except Exception as exc:  # noqa: BLE001
                self._fail(job, exc)

    def _can_step(self, job: Job) -> bool:
        if job.handle is None or job.finished or job.end_reason is not None:
            return False
        if job.outstanding >= job.max_buffered:
            return False  # backpressure: the consumer is behind
        limit, reason = job.source.limit()
        if job.frames >= limit:
            job.end_reason = reason
            return False
        if job.frames >= job.max_frames:
            job.end_reason = "max_new_tokens"
            return False
        return job.source.can_step(job.frames)

    def _launch(self, jobs: list[Job]) -> StepInFlight | None:
        try:
            return StepInFlight.begin(self.backend, [j.handle for j in jobs], split=self.settings.pipelined)
        except BackendError as exc:
            self._backend_broke(exc)
        except Exception as exc:  # noqa: BLE001 - the step as a whole failed: fail its jobs, keep the engine
            log.exception("backend step failed")
            for job in jobs:
                self._fail(job, exc)
        return None

    def _collect(self, jobs: list[Job], launched: StepInFlight) -> None:
        """The launched step's frames: EOS ends a job, every other frame goes out (frames) or waits for its chunk."""
        try:
            out = launched.finish()
        except BackendError as exc:
            self._backend_broke(exc)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("backend step failed")
            for job in jobs:
                self._fail(job, exc)
            return
        generated, now = 0, time.perf_counter()
        for i, job in enumerate(jobs):
            if job.finished:
                continue
            if i in out.failed:
                self._fail(job, out.failed[i])
                continue
            codes = out.codes[i]
            if codes[0] == self.eos_id:
                job.end_reason = "eos"
                continue
            job.frames += 1
            generated += 1
            if job.frames == 1:
                job.marks["first_frame"] = now
            if job.want_frames:
                job.send(("frame", codes.copy()), counted=not job.audio)
            if job.audio:
                job.pending.append(codes.copy())
        if generated:
            self.frame_rate.add(generated)
            self.observer.frames(generated)

    def _deliver(self, decoding: Decoding) -> None:
        """Send the chunks of one lane decode (a job whose push failed ends with its error)."""
        results = decoding.wait()
        now = time.perf_counter()
        for (job, pcm), first_frame, frames in zip(results, decoding.first_frames, decoding.num_frames):
            if job.finished:
                continue
            if isinstance(pcm, Exception):
                self._fail(job, pcm)
                continue
            chunk = AudioChunk(pcm=pcm, sample_rate=self.sample_rate, first_frame=first_frame, num_frames=frames,
                               time_s=now - job.created)
            job.chunks_sent += 1
            job.samples += len(chunk.pcm)
            first = job.first_audio is None
            if first:
                job.first_audio = job.marks["first_pcm"] = now
                self.observer.first_chunk(job, now - job.created)
            job.send(("chunk", chunk))
            if first:
                job.post(_mark_sent, job)

    # Ending jobs ----------------------------------------------------------------------------------------------

    def _fail(self, job: Job, error: Exception | str) -> None:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if not isinstance(error, (str, ValueError)):
            log.error("stream failed: %s", message, exc_info=error)
        self.observer.failed(job, message)
        self._finish(job, "error", message)

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.finished:
            return
        job.finished = True
        job.end_reason = reason
        for free, handle in ((self.backend.close, job.handle), (self.lane.close, job.codec_handle)):
            if handle is not None:
                try:
                    free(handle)
                except Exception:  # noqa: BLE001 - freeing must never stop the engine
                    log.exception("freeing a stream failed")
        job.handle = job.codec_handle = None
        job.pending.clear()
        if error is not None:
            job.send(("error", error), counted=False)
        info = job.info(reason, self.sample_rate)
        self.observer.done(job, info, time.perf_counter() - (job.started or time.perf_counter()))
        job.send(("done", info), counted=False)

    def _backend_broke(self, exc: BaseException) -> None:
        """The backend is unusable: every job that holds backend state fails; rebuild or report unhealthy."""
        log.error("backend failed: %s", exc)
        for job in list(self._active):
            if job.handle is not None and not job.finished:
                job.handle = None  # its state died with the backend
                self._finish(job, "error", f"the engine's backend failed: {exc}")
        if self.backend_factory is None:
            self._unhealthy = f"the backend failed and cannot be rebuilt: {exc}"
            return
        try:
            self.backend = self.backend_factory()
            log.warning("backend rebuilt after: %s", exc)
        except Exception as rebuild_exc:  # noqa: BLE001
            self._unhealthy = f"the backend failed ({exc}) and rebuilding it failed ({rebuild_exc})"
